"""Relay throughput at fan-out 10: Jasper's relay daemon beside a plain blocking forwarding loop.

Both relays run as their own process, get the same offered load from this process, and send to
the same sink process (10 UDP ports, one per child). Printed per relay: messages/s forwarded,
copies/s received at the sink, the sink's loss, and the relay's CPU seconds per copy; then the
ratios Jasper / plain. Run: python bench/relay_throughput.py [--rate 25000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FANOUT = 10
ADDR = "127.0.0.1"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plain_relay(port: int, targets: list[int]) -> None:
    """The baseline: recvfrom, then sendto each child, in a blocking loop."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((ADDR, port))
    dests = [(ADDR, p) for p in targets]
    print("ready", flush=True)
    while True:
        data = s.recv(2048)
        for d in dests:
            s.sendto(data, d)


def sink(ports: list[int], seconds: float) -> None:
    """Count datagrams on each port until `seconds` pass with nothing arriving."""
    socks = []
    for p in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.bind((ADDR, p))
        s.setblocking(False)
        socks.append(s)
    ep = select.epoll()
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
    by_fd = {s.fileno(): s for s in socks}
    print("ready", flush=True)
    count = 0
    last = time.monotonic()
    while time.monotonic() - last < seconds:
        for fd, _ in ep.poll(0.1):
            s = by_fd[fd]
            while True:
                try:
                    s.recv(2048)
                    count += 1
                except BlockingIOError:
                    break
            last = time.monotonic()
    print(json.dumps({"copies": count}), flush=True)


def offer(port: int, rate: float, seconds: float) -> int:
    """Send datagrams to the relay at `rate` per second for `seconds`; returns the count."""
    from jasper.wire import Header, encode

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = time.monotonic()
    n = 0
    total = int(rate * seconds)
    while n < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        while n < due:
            n += 1
            now = time.time_ns()
            h = Header(stream_id=1, session=1, seq=n, send_time_ns=now, deadline_ns=now)
            s.sendto(encode(h, b"x" * 64), (ADDR, port))
        time.sleep(0.0005)
    s.close()
    return n


def run_one(kind: str, rate: float, seconds: float, tmp: Path) -> dict[str, float]:
    from jasper.layout import topology_from_plan
    from jasper.tree import tree_shape
    from overlay.common import write_json
    from overlay.launch import free_port_base

    plan = tree_shape(FANOUT, fanout=FANOUT, hedge=0)
    base = free_port_base(ADDR, 1 + FANOUT)
    topo = topology_from_plan(plan, addr=ADDR, port_base=base)
    relay_port = base
    child_ports = [base + 1 + i for i in range(FANOUT)]
    sink_p = subprocess.Popen(
        [sys.executable, __file__, "--sink", *map(str, child_ports)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink_p.stdout is not None
    assert sink_p.stdout.readline().strip() == "ready"
    if kind == "jasper":
        path = tmp / f"topology-{kind}.json"
        write_json(path, topo.to_dict())
        ready = tmp / f"{kind}.ready"
        relay_p: subprocess.Popen[str] = subprocess.Popen(
            [sys.executable, "-m", "jasper_cli.main", "relay", "--topology", str(path),
             "--node-name", "r0.0", "--fast-path", "user", "--no-link-model",
             "--records", str(tmp), "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        while not ready.exists():
            time.sleep(0.05)
    else:
        relay_p = subprocess.Popen(
            [sys.executable, __file__, "--plain", str(relay_port), *map(str, child_ports)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert relay_p.stdout is not None
        assert relay_p.stdout.readline().strip() == "ready"
    cpu0 = cpu_seconds(relay_p.pid)
    t0 = time.monotonic()
    sent = offer(relay_port, rate, seconds)
    out, _ = sink_p.communicate(timeout=60)
    elapsed = time.monotonic() - t0 - 1.0  # the sink waits 1 s of silence before reporting
    cpu = cpu_seconds(relay_p.pid) - cpu0
    relay_p.terminate()
    relay_p.wait(10)
    copies = json.loads(out.strip().splitlines()[-1])["copies"]
    expected = sent * FANOUT
    return {
        "offered_msgs": sent,
        "msgs_per_s": copies / FANOUT / elapsed,
        "copies_per_s": copies / elapsed,
        "sink_loss": 1 - copies / expected,
        "cpu_s_per_copy": cpu / max(copies, 1),
        "cpu_s": cpu,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--rate",
        type=float,
        default=25000.0,
        help="offered messages/s (25000, above what either relay sustains)",
    )
    ap.add_argument("--seconds", type=float, default=3.0, help="offering time (3)")
    ap.add_argument("--sink", nargs="+", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--plain", nargs="+", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sink:
        sink(args.sink, 1.0)
        return 0
    if args.plain:
        plain_relay(args.plain[0], args.plain[1:])
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        res = {k: run_one(k, args.rate, args.seconds, Path(tmp)) for k in ("plain", "jasper")}
    print(f"relay fan-out {FANOUT}, offered {args.rate:g} msg/s for {args.seconds:g} s")
    print(f"{'relay':<8} {'msgs/s':>9} {'copies/s':>10} {'sink loss':>10} {'CPU µs/copy':>12}")
    for k, r in res.items():
        print(
            f"{k:<8} {r['msgs_per_s']:9.0f} {r['copies_per_s']:10.0f} "
            f"{100 * r['sink_loss']:9.2f}% {1e6 * r['cpu_s_per_copy']:12.2f}"
        )
    j, p = res["jasper"], res["plain"]
    print(
        f"ratio jasper/plain: msgs/s {j['msgs_per_s'] / p['msgs_per_s']:.2f}, "
        f"CPU per copy {j['cpu_s_per_copy'] / p['cpu_s_per_copy']:.2f}"
    )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
