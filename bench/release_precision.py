"""Release precision of a receiver hosting 20 endpoints, beside a naive asyncio call_at release.

A feeder process (standing in for the relays) sends each message to every endpoint, 3 copies
each as with H=2, with deadline = send + hold. Measured: release time − deadline over all
(endpoint, message) pairs that arrived before their deadline, p50/p99/p99.9/max, for
  - jasper-udp:        the Receiver delivering to a local UDP port per endpoint through its C
                       release thread; release time = when sendto returned;
  - jasper-udp@mp:     the same run seen by the MPs: the kernel receive time (SO_TIMESTAMPNS) of
                       each delivery at the MP's socket;
  - jasper-udp wake0:  the same, with idle CPUs asked to wake within 0 µs (PM QoS, the
                       receiver's --cpu-wakeup-us 0: on a VM idle vCPUs poll instead of halting);
  - jasper-udp wake0 2thr: the same with two C release threads, one per CPU;
  - jasper-udp wake0 mps-spin: one thread, the MPs polling their sockets instead of sleeping;
  - jasper-unix wake0: the same delivering to a Unix datagram socket per endpoint;
  - jasper-udp-python: the same with the Python release thread (c_release=False);
  - jasper-memory:     in process (async iterator use): the C release thread stamps each
                       endpoint's message at its deadline, no send;
  - jasper-memory-python: the same with the Python release thread (c_release=False);
  - asyncio:           loop.call_at(deadline) per message on the receive loop (the baseline).
All run their event loop in SCHED_FIFO when permitted (as the receiver daemon does);
--no-realtime keeps everything SCHED_OTHER.
Paths run interleaved, once per round. --host-probe adds, per round, a clock-reading spinner
on every CPU (idle CPUs polling): how often and how long the host takes a running vCPU away,
which bounds what any release path can reach here. Run on an otherwise idle host:
python bench/release_precision.py [--messages 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

ADDR = "127.0.0.1"
ENDPOINTS = 20
"""Endpoints on the receiver (--endpoints changes it for the run)."""


def topology(udp: bool):  # type: ignore[no-untyped-def]
    from jasper.layout import ports_needed, topology_from_plan
    from jasper.tree import tree_shape
    from overlay.launch import free_port_base

    plan = tree_shape(ENDPOINTS, fanout=ENDPOINTS, hedge=0)
    base = free_port_base(ADDR, ports_needed(plan) + ENDPOINTS)
    return topology_from_plan(
        plan,
        addr=ADDR,
        port_base=base,
        endpoints_per_receiver=ENDPOINTS,
        deliver_port_base=base + ports_needed(plan) if udp else None,
    )


def feed(ports: list[int], messages: int, rate: float, hold_ns: int) -> None:
    """The feeder process: each message to every port, 3 copies each, at `rate`."""
    from jasper.wire import Header, encode

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = time.monotonic()
    for seq in range(1, messages + 1):
        now = time.time_ns()
        deadline = now + hold_ns
        # The payload carries the deadline too, so an MP can match what it receives.
        data = encode(
            Header(stream_id=1, session=1, seq=seq, send_time_ns=now, deadline_ns=deadline),
            deadline.to_bytes(8, "big") + b"x" * 56,
        )
        for _copy in range(3):
            for p in ports:
                s.sendto(data, (ADDR, p))
        pause = start + seq / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    s.close()


@contextmanager
def feeding(ports: list[int], messages: int, rate: float, hold_ns: int) -> Iterator[Any]:
    """Run `feed` in its own process (as the relays are), and wait for it at the end."""
    proc = multiprocessing.get_context("fork").Process(
        target=feed, args=(ports, messages, rate, hold_ns), daemon=True
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.join(messages / rate + 60)


def read_mps(sinks: list[socket.socket], stop: Any, out: Any, spin: bool = False) -> None:
    """The MPs' process: read every delivery as it comes; (deadline, kernel receive time)
    pairs go back through `out` at the end. A Unix datagram socket holds only a few hundred
    datagrams, so the MPs must read during the run, as real ones do. With `spin` the MPs poll
    their sockets without blocking (as latency-sensitive trading applications do): no
    delivery then has to wake a sleeping MP."""
    import select

    from overlay.kernel import drain

    # MP applications are ordinary processes (the bench's main thread may be SCHED_FIFO).
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    seen: list[tuple[int, int]] = []

    def at_mp(data: bytes, _src: Any, rx_ns: int) -> None:
        seen.append((int.from_bytes(data[:8], "big"), rx_ns))

    poller = select.poll()
    for sink in sinks:
        poller.register(sink, select.POLLIN)
    by_fd = {sink.fileno(): sink for sink in sinks}
    while True:
        stopping = stop.is_set()
        if spin:
            for sink in sinks:
                drain(sink, at_mp, limit=1 << 20)
        else:
            for fd, _ in poller.poll(50):
                drain(by_fd[fd], at_mp, limit=1 << 20)
        if stopping:
            break
    for sink in sinks:
        while drain(sink, at_mp, limit=1 << 20)[0]:
            pass
    out.send(seen)


@contextmanager
def mps_reading(sinks: list[socket.socket], spin: bool = False) -> Iterator[list[tuple[int, int]]]:
    """Read `sinks` in a process of their own while the body runs; the list fills at exit."""
    seen: list[tuple[int, int]] = []
    if not sinks:
        yield seen
        return
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=read_mps, args=(sinks, stop, child_end, spin), daemon=True)
    proc.start()
    try:
        yield seen
    finally:
        stop.set()
        seen.extend(parent_end.recv())
        proc.join(10)


async def wait_for(proc: Any, hold_ns: int) -> None:
    while proc.is_alive():
        await asyncio.sleep(0.05)
    await asyncio.sleep(hold_ns / 1e9 + 0.2)


async def jasper_run(
    deliver: str,
    messages: int,
    rate: float,
    hold_ns: int,
    realtime: bool = True,
    c_release: bool = True,
    cpu_wakeup_us: int | None = None,
    release_threads: int = 1,
    mps_spin: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Release errors (ns) as the receiver stamped them, as the MPs' kernel saw them (socket
    deliveries: "udp" or "unix"), and of the first endpoint of each message's batch (when the
    release began)."""
    from overlay.kernel import SO_TIMESTAMPNS, open_udp
    from overlay.receiver import Receiver
    from overlay.release import tune_interpreter

    tune_interpreter()
    topo = topology(deliver != "memory")
    sinks: list[socket.socket] = []
    folder = tempfile.TemporaryDirectory(prefix="jasper-mp-")
    for i, (_, e) in enumerate(topo.endpoints() if deliver != "memory" else ()):
        assert e.deliver is not None
        if deliver == "udp":
            sinks.append(open_udp(ADDR, int(e.deliver.rsplit(":", 1)[1])))
        else:
            sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sink.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sink.setblocking(False)
            sink.bind(f"{folder.name}/mp{i}")
            sinks.append(sink)

    # The MPs read their sockets in a process of their own, as in real life; the kernel
    # stamped each datagram on arrival.
    rx = Receiver(
        topo,
        "h0",
        link_model=False,
        realtime=realtime,
        c_release=c_release,
        cpu_wakeup_us=cpu_wakeup_us,
        release_threads=release_threads,
    )
    if deliver == "unix":
        for i, ep in enumerate(rx.endpoints):
            ep.set_deliver(f"unix:{folder.name}/mp{i}")
    with mps_reading(sinks, spin=mps_spin) as seen:
        rx.start()
        with feeding([e.port for _, e in topo.endpoints()], messages, rate, hold_ns) as proc:
            await wait_for(proc, hold_ns)
        rx.stop()
    rx.close()
    for sink in sinks:
        sink.close()
    folder.cleanup()
    recs = rx.records.array()
    recs = recs[recs["arrival_ns"] < recs["deadline_ns"]]
    errors: np.ndarray = (recs["release_ns"] - recs["deadline_ns"]).astype(np.float64)
    on_time = set(recs["deadline_ns"].tolist())
    mp = np.array([t - d for d, t in seen if d in on_time], dtype=np.float64)
    first = np.full(int(recs["seq"].max()) + 1 if len(recs) else 0, np.inf)
    np.minimum.at(first, recs["seq"].astype(np.int64), errors)
    return errors, mp, first[np.isfinite(first)]


async def asyncio_run(messages: int, rate: float, hold_ns: int) -> np.ndarray:
    """Naive: one loop, recvfrom per endpoint socket, call_at(deadline) to hand over."""
    from overlay.fastwire import peek

    loop = asyncio.get_running_loop()
    socks = []
    for _ in range(ENDPOINTS):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ADDR, 0))
        s.setblocking(False)
        socks.append(s)
    errors: list[int] = []
    seen: set[tuple[int, int]] = set()

    def release(deadline: int) -> None:
        errors.append(time.time_ns() - deadline)

    def readable(i: int) -> None:
        s = socks[i]
        while True:
            try:
                data = s.recv(2048)
            except BlockingIOError:
                return
            fields = peek(data)
            seq, deadline = fields[4], fields[6]
            if (i, seq) in seen:
                continue
            seen.add((i, seq))
            delay = (deadline - time.time_ns()) / 1e9
            if delay > 0:
                loop.call_at(loop.time() + delay, release, deadline)

    for i, s in enumerate(socks):
        loop.add_reader(s.fileno(), readable, i)
    with feeding([s.getsockname()[1] for s in socks], messages, rate, hold_ns) as proc:
        await wait_for(proc, hold_ns)
    for s in socks:
        loop.remove_reader(s.fileno())
        s.close()
    return np.array(errors, dtype=np.float64)


def spin_for_gaps(cpu: int, seconds: float, out: Any) -> None:
    """One CPU's probe: spin reading the clock for `seconds` and send back every gap between
    two reads longer than 10 µs (ns): the time this vCPU was taken away from a running thread
    (interrupts, the hypervisor), the floor under any release error measured here."""
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    clock = time.perf_counter_ns
    gaps: list[int] = []
    now = clock()
    end = now + int(seconds * 1e9)
    while now < end:
        then, now = now, clock()
        if now - then > 10_000:
            gaps.append(now - then)
    out.send(gaps)


def host_gaps(seconds: float) -> tuple[np.ndarray, float]:
    """Gaps (ns) seen by one spinning probe per CPU at once, and the CPU-seconds probed."""
    ctx = multiprocessing.get_context("fork")
    cpus = sorted(os.sched_getaffinity(0))
    ends = []
    for cpu in cpus:
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=spin_for_gaps, args=(cpu, seconds, child_end), daemon=True)
        proc.start()
        ends.append((proc, parent_end))
    gaps: list[int] = []
    for proc, end in ends:
        gaps.extend(end.recv())
        proc.join(10)
    return np.array(gaps, dtype=np.float64), seconds * len(cpus)


def figures(a: np.ndarray) -> dict[str, float]:
    p50, p90, p99, p999 = np.percentile(a, [50, 90, 99, 99.9])
    return {"n": int(a.size), "p50_us": p50 / 1e3, "p90_us": p90 / 1e3, "p99_us": p99 / 1e3,
            "p999_us": p999 / 1e3, "max_us": float(a.max()) / 1e3}  # fmt: skip


def cpu_jiffies() -> tuple[int, int]:
    """(steal, total) jiffies of the machine: time the hypervisor kept our vCPUs off their
    host CPUs while they had work, which no setting in here can win back."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    return (parts[7] if len(parts) > 7 else 0), sum(parts)


VARIANTS: dict[str, dict[str, Any]] = {
    "jasper-udp": {"deliver": "udp"},
    "jasper-udp wake0": {"deliver": "udp", "cpu_wakeup_us": 0},
    "jasper-udp wake0 2thr": {"deliver": "udp", "cpu_wakeup_us": 0, "release_threads": 2},
    "jasper-udp wake0 mps-spin": {"deliver": "udp", "cpu_wakeup_us": 0, "mps_spin": True},
    "jasper-unix wake0": {"deliver": "unix", "cpu_wakeup_us": 0},
    "jasper-udp-python": {"deliver": "udp", "c_release": False},
    "jasper-memory": {"deliver": "memory"},
    "jasper-memory-python": {"deliver": "memory", "c_release": False},
}
"""Receiver paths measured (wake0: with idle CPUs asked to wake within 0 µs, i.e. to poll;
memory: in process, stamped by the C release thread, or -python by the Python one)."""


def main() -> int:
    global ENDPOINTS
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=1000, help="messages per path and round")
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--hold-us", type=float, default=2000.0)
    ap.add_argument(
        "--rounds", type=int, default=1, help="rounds, each running every path once (interleaved)"
    )
    ap.add_argument(
        "--paths",
        default=",".join(VARIANTS),
        help=f"comma-separated receiver paths to measure beside asyncio (of {', '.join(VARIANTS)})",
    )
    ap.add_argument(
        "--endpoints", type=int, default=ENDPOINTS, help=f"endpoints (default {ENDPOINTS})"
    )
    ap.add_argument("--no-realtime", action="store_true")
    ap.add_argument(
        "--host-probe",
        action="store_true",
        help="each round, also spin one probe per CPU for as long as a path runs and count the "
        "gaps in its clock reads: how often this host takes a running CPU away (the floor)",
    )
    args = ap.parse_args()
    if not 1 <= args.endpoints <= 200:
        ap.error(f"--endpoints {args.endpoints}: 1-200")
    ENDPOINTS = args.endpoints
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p not in VARIANTS]
    if unknown:
        ap.error(f"unknown path(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    hold = int(args.hold_us * 1000)
    rt = not args.no_realtime
    if rt:
        from overlay.release import LOOP_PRIORITY, make_realtime

        print(f"event loops SCHED_FIFO: {make_realtime(LOOP_PRIORITY)}")
    n, rate = args.messages, args.rate
    pooled: dict[str, list[np.ndarray]] = {}
    steal: dict[str, list[int]] = {}

    def add(key: str, a: np.ndarray) -> None:
        pooled.setdefault(key, []).append(a)

    probed: list[np.ndarray] = []
    probed_s = 0.0
    wake = None
    if args.host_probe:
        from overlay.kernel import CpuWakeupLatency

        wake = CpuWakeupLatency(0)  # as the wake0 paths: idle CPUs poll, none halts
    for r in range(args.rounds):
        if args.host_probe:
            gaps, cpu_s = host_gaps(n / rate)
            probed.append(gaps)
            probed_s += cpu_s
        add("asyncio", asyncio.run(asyncio_run(n, rate, hold)))
        for name in paths:
            before = cpu_jiffies()
            own, mp, first = asyncio.run(jasper_run(messages=n, rate=rate, hold_ns=hold,
                                                    realtime=rt, **VARIANTS[name]))  # fmt: skip
            after = cpu_jiffies()
            seen = steal.setdefault(name, [0, 0])
            seen[0] += after[0] - before[0]
            seen[1] += after[1] - before[1]
            add(name, own)
            if mp.size:
                add(f"{name}@mp", mp)
            add(f"{name} first", first)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    if wake is not None:
        wake.close()
    res = {k: figures(np.concatenate(v)) for k, v in pooled.items()}
    print(
        f"release error, {ENDPOINTS} endpoints, {n} messages at {rate:g}/s x {args.rounds} "
        f"round(s), hold {hold / 1e3:g} µs"
    )
    print("(@mp: the MPs' kernel receive times; first: the first endpoint of each message)")
    print(f"{'path':<26} {'n':>6} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8} {'p99.9 µs':>9} "
          f"{'max µs':>8}")  # fmt: skip
    for k, r in res.items():
        print(f"{k:<26} {r['n']:6d} {r['p50_us']:8.1f} {r['p90_us']:8.1f} {r['p99_us']:8.1f} "
              f"{r['p999_us']:9.1f} {r['max_us']:8.1f}")  # fmt: skip
    for name, (stolen, total) in steal.items():
        print(f"steal during {name}: {100 * stolen / max(1, total):.1f}% of the machine's CPU time")
    if args.host_probe:
        g = np.concatenate(probed)
        per_s = {t: int((g >= t * 1000).sum()) / probed_s for t in (20, 50, 100, 1000)}
        print(f"host probe ({probed_s:.0f} CPU-s spinning on every CPU, idle CPUs polling): gaps "
              + ", ".join(f">= {t} µs {v:.2f}/s" for t, v in per_s.items())
              + f"; {100 * g[g >= 50_000].sum() / (probed_s * 1e9):.3f}% of the time in gaps "
              f">= 50 µs, longest {g.max() / 1e3 if g.size else 0:.0f} µs")  # fmt: skip
    base = res["asyncio"]
    for k in res:
        if k != "asyncio":
            print(f"ratio {k}/asyncio: p50 {res[k]['p50_us'] / base['p50_us']:.3f}, "
                  f"p99 {res[k]['p99_us'] / base['p99_us']:.3f}")  # fmt: skip
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
