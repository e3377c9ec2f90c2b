"""Failover: the root relay's process dies; the controller plans around it, traffic resumes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from controller.loopback import (
    DaemonSet,
    DeliverySink,
    LoopbackController,
    free_udp_block,
    wait_for,
)

RELAYS = [f"relay{i}" for i in range(5)]
ENDPOINTS = 6


@pytest.mark.slow
def test_dead_root_relay_is_planned_around(tmp_path: Path) -> None:
    ctl = LoopbackController(db_path=tmp_path / "controller.db", heartbeat_timeout_s=3)
    ctl.start()
    daemons = DaemonSet(ctl, tmp_path)
    sink = DeliverySink(ENDPOINTS)
    try:
        # Root plus three leaf relays, one relay spare.
        ctl.create_stream(1, "md", depth=2, fanout=3, hold_ns=2_000_000)
        for name in RELAYS:
            daemons.start("relay", name, "--port", str(free_udp_block(1)), "--fast-path", "user")
        base = free_udp_block(ENDPOINTS)
        daemons.start(
            "receiver",
            "rx0",
            "--port-base",
            str(base),
            "--endpoints",
            str(ENDPOINTS),
            "--fast-path",
            "user",
            "--no-realtime",
        )
        daemons.start("publisher", "pub", "--stream", "1", "--rate", "100")
        ctl.wait_nodes({*RELAYS, "rx0", "pub"}, 60)
        _, token = ctl.create_mp("mp")
        for i in range(ENDPOINTS):
            ctl.subscribe(token, 1, "127.0.0.1", base + i, deliver=f"udp:127.0.0.1:{sink.port(i)}")
        wait_for(lambda: all(len(sink.times[i]) > 20 for i in range(ENDPOINTS)), 60, "traffic")
        tree = ctl.tree(1)
        root = tree["levels"][0][0]["node"]
        epoch = tree["plan_epoch"]

        daemons.procs[root].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        def replanned() -> bool:
            t = ctl.tree(1)
            used = {s["node"] for level in t["levels"] for s in level}
            return t["plan_epoch"] > epoch and t["pending_epoch"] is None and root not in used

        wait_for(replanned, 60, "a plan without the dead root")
        dead = {n["name"]: n["alive"] for n in ctl.nodes()}
        assert dead[root] is False
        tree = ctl.tree(1)
        assert all(root not in e["parents"] for e in tree["endpoints"])
        assert all(len(set(e["parents"])) == 3 for e in tree["endpoints"])  # spare relay used
        mark = time.monotonic()
        wait_for(
            lambda: all(
                sink.count_between(i, mark, time.monotonic()) > 20 for i in range(ENDPOINTS)
            ),
            60,
            "deliveries through the new root",
        )
        assert mark > killed_at
        metrics = ctl.call_text("/metrics")
        assert 'jasper_replans_total{reason="relay_dead"}' in metrics
    finally:
        daemons.stop()
        sink.close()
        ctl.close()
