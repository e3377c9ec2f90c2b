"""Release precision of a receiver hosting 20 endpoints, beside a naive asyncio call_at release.

Each message goes to every endpoint (3 copies each, as with H=2) with deadline = send + hold.
Measured: release time − deadline over all (endpoint, message) pairs, p50/p99/p99.9/max, for
  - jasper-memory: the Receiver with its release thread, handing over in process;
  - jasper-udp:    the same, sending each release to a local UDP port per endpoint;
  - asyncio:       loop.call_at(deadline) per message on the receive loop (the baseline).
All three run their event loop in SCHED_FIFO when permitted (as the receiver daemon does);
--no-realtime keeps everything SCHED_OTHER.
Run on an otherwise idle host: python bench/release_precision.py [--messages 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time

import numpy as np

ADDR = "127.0.0.1"
ENDPOINTS = 20


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


async def feed(ports: list[int], messages: int, rate: float, hold_ns: int) -> None:
    from jasper.wire import Header, encode

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for seq in range(1, messages + 1):
        now = time.time_ns()
        data = encode(
            Header(stream_id=1, session=1, seq=seq, send_time_ns=now, deadline_ns=now + hold_ns),
            b"x" * 64,
        )
        for _copy in range(3):
            for p in ports:
                s.sendto(data, (ADDR, p))
        await asyncio.sleep(1 / rate)
    s.close()


async def jasper_run(
    udp: bool, messages: int, rate: float, hold_ns: int, realtime: bool = True
) -> np.ndarray:
    from overlay.receiver import Receiver
    from overlay.release import tune_interpreter

    tune_interpreter()
    topo = topology(udp)
    sinks = []
    if udp:
        for _, e in topo.endpoints():
            assert e.deliver is not None
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((ADDR, int(e.deliver.rsplit(":", 1)[1])))
            sinks.append(s)
    rx = Receiver(topo, "h0", link_model=False, realtime=realtime)
    rx.start()
    await feed([e.port for _, e in topo.endpoints()], messages, rate, hold_ns)
    await asyncio.sleep(hold_ns / 1e9 + 0.2)
    rx.stop()
    rx.close()
    for s in sinks:
        s.close()
    recs = rx.records.array()
    recs = recs[recs["arrival_ns"] < recs["deadline_ns"]]
    errors: np.ndarray = (recs["release_ns"] - recs["deadline_ns"]).astype(np.float64)
    return errors


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
    await feed([s.getsockname()[1] for s in socks], messages, rate, hold_ns)
    await asyncio.sleep(hold_ns / 1e9 + 0.2)
    for s in socks:
        loop.remove_reader(s.fileno())
        s.close()
    return np.array(errors, dtype=np.float64)


def figures(a: np.ndarray) -> dict[str, float]:
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {"n": int(a.size), "p50_us": p50 / 1e3, "p99_us": p99 / 1e3, "p999_us": p999 / 1e3,
            "max_us": float(a.max()) / 1e3}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--hold-us", type=float, default=2000.0)
    ap.add_argument("--no-realtime", action="store_true")
    args = ap.parse_args()
    hold = int(args.hold_us * 1000)
    if not args.no_realtime:
        from overlay.release import LOOP_PRIORITY, make_realtime

        print(f"event loops SCHED_FIFO: {make_realtime(LOOP_PRIORITY)}")
    res = {
        "asyncio": figures(asyncio.run(asyncio_run(args.messages, args.rate, hold))),
        "jasper-memory": figures(
            asyncio.run(jasper_run(False, args.messages, args.rate, hold, not args.no_realtime))
        ),
        "jasper-udp": figures(
            asyncio.run(jasper_run(True, args.messages, args.rate, hold, not args.no_realtime))
        ),
    }
    print(f"release error, {ENDPOINTS} endpoints, {args.messages} messages at {args.rate:g}/s")
    print(f"{'path':<14} {'n':>6} {'p50 µs':>8} {'p99 µs':>8} {'p99.9 µs':>9} {'max µs':>8}")
    for k, r in res.items():
        print(f"{k:<14} {r['n']:6d} {r['p50_us']:8.1f} {r['p99_us']:8.1f} {r['p999_us']:9.1f} "
              f"{r['max_us']:8.1f}")  # fmt: skip
    base = res["asyncio"]
    for k in ("jasper-memory", "jasper-udp"):
        print(f"ratio {k}/asyncio: p50 {res[k]['p50_us'] / base['p50_us']:.2f}, "
              f"p99 {res[k]['p99_us'] / base['p99_us']:.2f}")  # fmt: skip
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
