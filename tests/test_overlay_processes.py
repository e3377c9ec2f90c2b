"""Real daemon processes on loopback: a relay killed mid-stream, a flood of malformed datagrams."""

from __future__ import annotations

import glob
import json
import os
import random
import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jasper.layout import ports_needed, topology_from_plan
from jasper.metrics import fairness_report
from jasper.records import expand_releases
from jasper.topology import Topology
from jasper.tree import tree_shape
from jasper.wire import Header, encode
from overlay.common import write_json
from overlay.launch import Cluster, free_port_base
from overlay.recordlog import load_releases, load_run_releases

ADDR = "127.0.0.1"


def start(
    tmp: Path, *, n: int, fanout: int, hedge: int, hold_ns: int = 20_000_000
) -> tuple[Cluster, Topology]:
    plan = tree_shape(n, fanout=fanout, hedge=hedge)
    base = free_port_base(ADDR, ports_needed(plan))
    topo = topology_from_plan(plan, addr=ADDR, port_base=base, hold_ns=hold_ns)
    path = tmp / "topology.json"
    write_json(path, topo.to_dict())
    cluster = Cluster(path, tmp)
    # Each relay in its own process so one can be killed alone.
    for r in plan.relays():
        cluster.add_relay([r], "--fast-path", "user")
    for h in topo.receivers:
        cluster.add_receiver(h.name, "--fast-path", "user", "--no-realtime")
    cluster.wait_ready()
    return cluster, topo


def results(tmp: Path, topo: Topology) -> tuple[Any, dict[str, Any]]:
    sent = np.load(tmp / "sent.npy")
    deliveries = load_run_releases(tmp)
    report = fairness_report(sent, deliveries, {1: [e.name for _, e in topo.endpoints()]})
    statuses = {
        Path(p).stem: json.loads(Path(p).read_text()) for p in glob.glob(str(tmp / "status-*"))
    }
    return report, statuses


def wait_publisher(cluster: Cluster, timeout: float = 60) -> None:
    pub = next(c for c in cluster.children if c.kind == "publisher")
    assert pub.proc is not None
    assert pub.proc.wait(timeout) == 0


@pytest.mark.slow
@pytest.mark.parametrize("hedge", [1, 2])
def test_relay_killed_mid_stream_loses_nothing(tmp_path: Path, hedge: int) -> None:
    cluster, topo = start(tmp_path, n=20, fanout=5, hedge=hedge)
    with cluster:
        cluster.add_publisher("--rate", "100", "--duration", "3")
        time.sleep(1.5)
        victim = next(c for c in cluster.children if c.name == "relay-r1.1")
        cluster.kill(victim)
        wait_publisher(cluster)
        time.sleep(0.5)
    report, statuses = results(tmp_path, topo)
    assert report.messages >= 250
    assert report.lost_pairs == 0
    assert report.repeated_records == 0
    assert "status-relay-r1.1" not in statuses  # it really died without a word
    # Endpoints fed by r1.1 saw its copies stop: fewer copies from it than messages.
    eps = statuses["status-receiver-h0"]["endpoints"]
    from_victim = [c["copies_from"].get("r1.1", 0) for c in eps.values()]
    assert max(from_victim) < report.messages
    assert all(c["accepted"] == report.messages for c in eps.values())


def junk_datagrams(count: int, seed: int = 1) -> list[bytes]:
    """Random bytes (never the magic) and truncated or corrupted valid datagrams."""
    rng = random.Random(seed)
    valid = encode(Header(stream_id=1, session=1, seq=7, send_time_ns=1, deadline_ns=2), b"x" * 30)
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            b = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
            if b[:2] == b"JS":
                b = b"X" + b[1:]
            out.append(b)
        elif kind == 1:
            out.append(valid[: rng.randrange(0, len(valid))])
        elif kind == 2:
            out.append(valid[:2] + bytes((rng.choice([0, 1, 9, 255]),)) + valid[3:])
        else:
            out.append(valid[:40] + struct.pack("!H", rng.randrange(31, 65535)) + valid[42:])
    return out


@pytest.mark.slow
def test_malformed_flood_counted_while_valid_traffic_flows(tmp_path: Path) -> None:
    cluster, topo = start(tmp_path, n=20, fanout=5, hedge=2)
    junk = junk_datagrams(10_000)
    relay_addr = topo.address_of("r1.0")
    ep_addr = topo.address_of("e0")
    with cluster:
        cluster.add_publisher("--rate", "100", "--duration", "3")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i, b in enumerate(junk):
                s.sendto(b, relay_addr)
                s.sendto(b, ep_addr)
                if i % 200 == 199:
                    time.sleep(0.02)  # spread over the stream, below the socket buffers
        finally:
            s.close()
        wait_publisher(cluster)
        time.sleep(0.5)
        alive = [c.name for c in cluster.alive()]
    assert "relay-r1.0" in alive and "receiver-h0" in alive  # no crash
    report, statuses = results(tmp_path, topo)
    relay = statuses["status-relay-r1.0"]["nodes"]["r1.0"]
    ep = statuses["status-receiver-h0"]["endpoints"]["e0"]
    assert relay["kernel_drops"] == 0 and ep["kernel_drops"] == 0
    assert relay["malformed_total"] == 10_000
    assert ep["malformed_total"] == 10_000
    assert set(relay["malformed"]) <= {"short", "magic", "version", "flags", "length"}
    assert report.lost_pairs == 0 and report.messages >= 250
    assert all(c.proc is not None and c.proc.returncode == 0 for c in cluster.children)
    assert not [p for p in cluster.children if p.proc is not None and _alive(p.proc.pid)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_receiver_releases_on_its_own_node_clock(tmp_path: Path) -> None:
    """An emulated clock 2 ms ahead (never corrected) releases 2 ms early in true time."""
    plan = tree_shape(4, fanout=4, hedge=0)
    base = free_port_base(ADDR, ports_needed(plan))
    topo = topology_from_plan(plan, addr=ADDR, port_base=base, hold_ns=20_000_000)
    path = tmp_path / "topology.json"
    write_json(path, topo.to_dict())
    with Cluster(path, tmp_path) as cluster:
        cluster.add_relay(["r0.0"], "--fast-path", "user")
        cluster.add_receiver("h0", "--fast-path", "user", "--clock-offset-us", "2000")
        cluster.wait_ready()
        cluster.add_publisher("--rate", "50", "--duration", "1")
        wait_publisher(cluster)
        time.sleep(0.5)
    d = expand_releases(load_releases(tmp_path / "releases-h0.npz"))
    assert len(d) == 50 * 4
    early = (d["deadline_ns"] - d["release_ns"]) / 1e3
    assert np.median(early) == pytest.approx(2000, abs=500)
    assert not d["synced"].any()  # an uncorrected emulated clock is never synchronized
