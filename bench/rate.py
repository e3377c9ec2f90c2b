"""Highest sustainable rate of the receive path, Python vs native, searched side by side.

Sustainable: achieved >= 99% of offered messages, 0 (message, endpoint) pairs lost, late pairs
<= 0.1%. For each case and data path the search doubles the offered rate until a run fails,
then bisects; both paths run alternately in the same invocation (this machine is shared and
noisy, so only figures from one run are compared).

Cases:
  a  one receiver host, 20 endpoints, H=2: a paced sender impersonates the three parents of
     every endpoint (3 copies per message and endpoint); the receiver process is the one under
     test. CPU µs per arriving copy and per message are the receiver process's own (/proc).
     Paths: python, native, and native+ebpf (the native path behind the kernel's receiver
     filter, which drops duplicates before user space; its own cost, ~0.17 µs per copy in
     bench/fastpath.py, runs in the senders' softirq on loopback and is not in the figure).
  b  `jasper demo --receivers 100 --hedge 2` with the link model on.
  c  the same without the link model.

    .venv/bin/python bench/rate.py --case a --duration 5 --batch 20
    .venv/bin/python bench/rate.py --case a --paths python,native,native+ebpf
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from jasper.layout import ports_needed, topology_from_plan  # noqa: E402
from jasper.records import message_offsets  # noqa: E402
from jasper.topology import Topology  # noqa: E402
from jasper.tree import tree_shape  # noqa: E402
from jasper.wire import Header, encode_batch  # noqa: E402
from overlay.launch import free_port_base  # noqa: E402
from overlay.recordlog import load_releases  # noqa: E402

ADDR = "127.0.0.1"
HZ = os.sysconf("SC_CLK_TCK")


@dataclass
class Trial:
    """One run at one offered rate."""

    case: str
    path: str
    offered: float
    """Offered messages/s."""
    batch: int
    """Messages per datagram."""
    messages: int = 0
    datagrams: int = 0
    achieved: float = 0.0
    """Messages/s whose every pair was delivered, over the send window."""
    pairs: int = 0
    lost_pairs: int = 0
    late_pairs: int = 0
    copies: int = 0
    cpu_s: float = 0.0
    """CPU seconds of the process(es) under test over the run."""
    us_per_copy: float = 0.0
    us_per_message: float = 0.0
    kernel_drops: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.messages > 0
            and self.achieved >= 0.99 * self.offered
            and self.lost_pairs == 0
            and self.late_pairs <= 0.001 * self.pairs
        )


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


# -- case a: one receiver host ------------------------------------------------------------------


def host_topology(hold_ns: int) -> Topology:
    # Fan-out 5: four leaf relays of five endpoints each, so every endpoint has H+1 = 3 parents.
    plan = tree_shape(20, fanout=5, hedge=2)
    base = free_port_base(ADDR, ports_needed(plan))
    return topology_from_plan(
        plan, addr=ADDR, port_base=base, hold_ns=hold_ns, endpoints_per_receiver=20
    )


def run_host(
    path: str, rate: float, batch: int, duration: float, hold_ns: int, spin_us: int | None = None
) -> Trial:
    # "native+ebpf": the native path behind the kernel's receiver filter, which drops the
    # duplicate copies before user space (the copies' kernel work, filter included, runs in the
    # senders' softirq on loopback, so it is not in the receiver's CPU: bench/fastpath.py
    # measures the filter apart).
    datapath, _, fast_path = path.partition("+")
    fast_path = fast_path or "user"
    topo = host_topology(hold_ns)
    host = topo.receivers[0]
    with tempfile.TemporaryDirectory(prefix="jasper-rate-") as tmp:
        out = Path(tmp)
        topo_path = out / "topology.json"
        topo_path.write_text(json.dumps(topo.to_dict()))
        ready = out / "ready"
        log = (out / "receiver.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "jasper_cli.main", "receiver", "--topology", str(topo_path),
             "--node-name", host.name, "--datapath", datapath, "--deliver", "sink",
             "--no-link-model", "--fast-path", fast_path, "--records", str(out),
             "--ready-file", str(ready), "--status-interval", "0",
             *(("--spin-us", str(spin_us)) if spin_us is not None else ())],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        try:
            end = time.monotonic() + 30
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(
                        f"receiver did not start: {(out / 'receiver.log').read_text()}"
                    )
                time.sleep(0.05)
            cpu0 = proc_cpu_s(proc.pid)
            sent, datagrams, copies = send_copies(topo, rate, batch, duration, hold_ns)
            time.sleep(hold_ns / 1e9 + 0.3)
            cpu1 = proc_cpu_s(proc.pid)
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        status = json.loads((out / f"status-receiver-{host.name}.json").read_text())
        rel = load_releases(out / f"releases-{host.name}.npz")
    eps = status["endpoints"]
    pairs = sent * len(eps)
    # One record per (datagram, endpoint): expand to (endpoint, message) pairs by index only.
    src, offset = message_offsets(rel.records["count"])
    seqs = rel.records["seq"][src].astype(np.int64) + offset
    pair_keys = np.unique(rel.records["endpoint"][src].astype(np.int64) << 40 | seqs)
    delivered = len(pair_keys)
    late = sum(int(e["late"]) for e in eps.values())
    per_seq = np.bincount(pair_keys & ((1 << 40) - 1), minlength=sent + 1)[1:]
    complete = int((per_seq >= len(eps)).sum())
    received = sum(int(e["received"]) for e in eps.values())
    cpu = cpu1 - cpu0
    t = Trial(
        case="a",
        path=path,
        offered=rate,
        batch=batch,
        messages=sent,
        datagrams=datagrams,
        achieved=complete / duration,
        pairs=pairs,
        lost_pairs=pairs - delivered,
        late_pairs=late,
        copies=received,
        cpu_s=cpu,
        us_per_copy=cpu / max(1, copies) * 1e6,
        us_per_message=cpu / max(1, sent) * 1e6,
        kernel_drops=sum(int(e["kernel_drops"]) for e in eps.values()),
    )
    t.extra["copies_sent"] = copies
    t.extra["copies_to_user_space"] = received
    if "native" in status:
        t.extra["native"] = {
            k: v for k, v in status["native"].items() if isinstance(v, int | float | bool)
        }
    return t


def send_copies(
    topo: Topology, rate: float, batch: int, duration: float, hold_ns: int
) -> tuple[int, int, int]:
    """Impersonate every endpoint's parents: each datagram goes from each parent's own address
    to each of its endpoints. Returns (messages, datagrams, copies) sent."""
    addrs = topo.addresses()
    socks: dict[str, socket.socket] = {}
    routes: list[tuple[socket.socket, tuple[str, int]]] = []
    try:
        host = topo.receivers[0]
        ports = {ep.name: ep.port for ep in host.endpoints}
        for relay in topo.relays:
            for target in relay.targets:
                if target.node not in ports:
                    continue
                s = socks.get(relay.name)
                if s is None:
                    s = socks[relay.name] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                    s.bind(addrs[relay.name])
                routes.append((s, (host.addr, ports[target.node])))
        session = int(time.time()) & 0xFFFFFFFF
        body = [b"%032d" % i for i in range(batch)]  # ITCH-sized messages
        total = int(rate * duration)
        seq, datagrams, copies = 1, 0, 0
        start = time.monotonic_ns()
        period_ns = 1e9 / rate
        while seq <= total:
            due = start + int((seq - 1) * period_ns)
            now = time.monotonic_ns()
            if due > now:
                time.sleep((due - now) / 1e9)
            n = min(batch, total - seq + 1)
            sent_ns = time.time_ns()
            h = Header(
                stream_id=topo.stream.id, session=session, seq=seq, send_time_ns=sent_ns,
                deadline_ns=sent_ns + hold_ns, plan_epoch=topo.plan_epoch,
            )  # fmt: skip
            data = encode_batch(h, body[:n])
            for s, dst in routes:
                s.sendto(data, dst)
            copies += len(routes)
            datagrams += 1
            seq += n
        return total, datagrams, copies
    finally:
        for s in socks.values():
            s.close()


# -- cases b and c: the demo --------------------------------------------------------------------


def run_demo(path: str, rate: float, batch_us: float, duration: float, link: bool) -> Trial:
    with tempfile.TemporaryDirectory(prefix="jasper-rate-demo-") as tmp:
        out = Path(tmp) / "demo"
        argv = [sys.executable, "-m", "jasper_cli.main", "demo", "--receivers", "100",
                "--hedge", "2", "--rate", str(rate), "--duration", str(duration),
                "--batch-us", str(batch_us), "--datapath", path, "--output", str(out),
                ]  # fmt: skip
        if not link:
            argv.append("--no-link-model")
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"demo failed: {proc.stderr[-2000:]}")
        summary = json.loads((out / "summary.json").read_text())
        statuses = [json.loads(p.read_text()) for p in out.glob("status-receiver-*.json")]
    rep = summary["fairness"]
    pairs = int(rep.get("expected_pairs", 0))
    copies = sum(int(e["received"]) for s in statuses for e in s["endpoints"].values())
    cpu = sum(float(s["process"]["cpu_s"]) for s in statuses)
    messages = int(rep.get("messages", 0))
    t = Trial(
        case="b" if link else "c",
        path=path,
        offered=rate,
        batch=0,
        messages=messages,
        achieved=float(summary.get("achieved_rate", 0.0)),
        pairs=pairs,
        lost_pairs=int(rep.get("lost_pairs", 0)),
        late_pairs=int(rep.get("late_pairs", 0)),
        copies=copies,
        cpu_s=cpu,
        us_per_copy=cpu / max(1, copies) * 1e6,
        us_per_message=cpu / max(1, messages) * 1e6,
    )
    t.extra["batch_us"] = batch_us
    t.extra["p_fair"] = rep.get("p_fair")
    t.extra["data_paths"] = summary.get("counters", {}).get("data_paths")
    return t


# -- search --------------------------------------------------------------------------------------


def search(trial: Any, start: float, limit: float, steps: int) -> tuple[float, list[Trial]]:
    """Double from `start` until a failure (or `limit`), then bisect `steps` times."""
    runs: list[Trial] = []
    good, bad = 0.0, None
    rate = start
    while rate <= limit:
        t = trial(rate)
        runs.append(t)
        report(t)
        if not t.ok:
            bad = rate
            break
        good = rate
        rate *= 2
    for _ in range(steps if bad is not None else 0):
        mid = (good + bad) / 2 if good else bad / 2
        t = trial(mid)
        runs.append(t)
        report(t)
        if t.ok:
            good = mid
        else:
            bad = mid
    return good, runs


def report(t: Trial) -> None:
    print(
        f"  {t.case} {t.path:6s} offered {t.offered:9.0f} msg/s  achieved {t.achieved:9.0f}  "
        f"lost {t.lost_pairs:7d}  late {t.late_pairs:6d}/{t.pairs}  "
        f"{t.us_per_copy:6.2f} µs/copy  {t.us_per_message:7.2f} µs/msg  "
        f"drops {t.kernel_drops}  {'ok' if t.ok else 'FAIL'}",
        flush=True,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", choices=("a", "b", "c", "all"), default="a")
    p.add_argument("--paths", default="python,native", help="data paths, comma-separated")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (5)")
    p.add_argument("--batch", type=int, default=20, help="case a: messages per datagram (20)")
    p.add_argument("--batch-us", type=float, default=50.0, help="cases b/c: batch window (50)")
    p.add_argument("--hold-us", type=float, default=5000.0, help="case a: hold, µs (5000)")
    p.add_argument(
        "--spin-us",
        type=int,
        default=None,
        help="case a: the receiver's --spin-us (default: its own, 100 µs of busy-wait before "
        "each deadline, which at one deadline per datagram is most of its CPU)",
    )
    p.add_argument("--start", type=float, default=1000.0, help="first offered rate (1000)")
    p.add_argument("--limit", type=float, default=2_000_000.0, help="highest rate tried")
    p.add_argument("--steps", type=int, default=3, help="bisection steps after a failure (3)")
    p.add_argument("--json", metavar="PATH", help="write every run here")
    args = p.parse_args()
    paths = [x for x in args.paths.split(",") if x]
    cases = ["a", "b", "c"] if args.case == "all" else [args.case]
    results: dict[str, dict[str, float]] = {}
    runs: list[Trial] = []
    print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
    for case in cases:
        for path in paths:
            print(f"case {case}, {path} path:", flush=True)
            if case == "a":

                def trial(rate: float, path: str = path) -> Trial:
                    return run_host(
                        path,
                        rate,
                        args.batch,
                        args.duration,
                        int(args.hold_us * 1e3),
                        args.spin_us,
                    )
            else:

                def trial(rate: float, path: str = path, link: bool = case == "b") -> Trial:
                    return run_demo(path, rate, args.batch_us, args.duration, link)

            best, rs = search(trial, args.start, args.limit, args.steps)
            runs += rs
            results.setdefault(case, {})[path] = best
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("\nhighest sustainable offered rate (msg/s):")
    for case, by_path in results.items():
        row = "  ".join(f"{k} {v:,.0f}" for k, v in by_path.items())
        base = by_path.get("python") or 0
        ratio = (
            f"  native/python {by_path['native'] / base:.1f}x"
            if base and "native" in by_path
            else ""
        )
        print(f"  case {case}: {row}{ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
