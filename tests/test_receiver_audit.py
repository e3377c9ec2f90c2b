"""A real receiver process writes the release audit log (--audit-log); `jasper audit` reads it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from jasper.audit import decode_records
from jasper.clockbound import ClockStatus
from jasper.layout import ports_needed, topology_from_plan
from jasper.records import expand_releases
from jasper.tree import tree_shape
from overlay.common import write_json
from overlay.launch import Cluster, free_port_base
from overlay.recordlog import load_releases
from overlay.refclock import ChronyConfig, ReferenceChrony, chronyd_path
from tests.conftest import require_privileged

ADDR = "127.0.0.1"
RATE = 50
DURATION_S = 2


@pytest.fixture()
def reference() -> Iterator[ReferenceChrony]:
    require_privileged("chronyd", chronyd_path() is not None)
    ref = ReferenceChrony(ChronyConfig(exit_after_s=300))
    ref.start()
    try:
        yield ref
    finally:
        ref.cleanup()


def test_receiver_audit_log_read_by_jasper_audit(
    tmp_path: Path, reference: ReferenceChrony
) -> None:
    plan = tree_shape(4, fanout=4, hedge=0)
    base = free_port_base(ADDR, ports_needed(plan))
    topo = topology_from_plan(plan, addr=ADDR, port_base=base, hold_ns=20_000_000)
    path = tmp_path / "topology.json"
    write_json(path, topo.to_dict())
    pattern = str(tmp_path / "audit-{node}.jal")
    # A node clock 300 µs off, corrected by SNTP against the reference chronyd: the records
    # carry a known bound and the synchronized status.
    clock = ["--clock-offset-us", "300", "--ntp-server", f"127.0.0.1:{reference.ntp_port}"]
    with Cluster(path, tmp_path) as cluster:
        cluster.add_relay(["r0.0"], "--fast-path", "user")
        cluster.add_receiver(
            "h0", "--fast-path", "user", "--no-realtime", "--audit-log", pattern, *clock
        )
        cluster.wait_ready()
        pub = cluster.add_publisher("--rate", str(RATE), "--duration", str(DURATION_S))
        assert pub.proc is not None
        assert pub.proc.wait(120) == 0
        time.sleep(0.5)  # the last deadlines (20 ms hold) pass
    rx = next(c for c in cluster.children if c.kind == "receiver")
    assert rx.proc is not None
    why = f"receiver exit {rx.proc.returncode}: {rx.log_path.read_text(errors='replace')[-3000:]}"
    audit = tmp_path / "audit-h0.jal"
    assert audit.exists(), why
    assert (tmp_path / "releases-h0.npz").exists(), why
    deliveries = expand_releases(load_releases(tmp_path / "releases-h0.npz"))
    header, records, truncated = decode_records(audit.read_bytes())
    assert truncated == 0
    assert header.meta["node"] == "h0"
    assert len(records) == len(deliveries) == RATE * DURATION_S * 4
    assert sorted(header.meta["endpoints"]) == sorted(set(deliveries["endpoint"].tolist()))
    # One record per (message, endpoint), with the deadline the message carried.
    pairs = set(zip(records["seq"].tolist(), records["endpoint"].tolist(), strict=True))
    assert len(pairs) == len(records)
    assert set(records["deadline_ns"].tolist()) == set(deliveries["deadline_ns"].tolist())
    assert (records["status"] == int(ClockStatus.SYNCHRONIZED)).all()
    assert ((records["bound_ns"] > 0) & (records["bound_ns"] < 10_000_000)).all()
    # Released at the deadline on the node's corrected clock (generous: a loaded host).
    divergence = records["release_ns"].astype(np.int64) - records["deadline_ns"].astype(np.int64)
    assert abs(float(np.median(divergence))) < 2_000_000

    out = subprocess.run(
        [sys.executable, "-m", "jasper_cli.main", "audit", "--json", str(audit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode in (0, 1), out.stderr  # 1: some bound above 100 µs (flagged)
    summary = json.loads(out.stdout)
    assert summary["releases"] == len(records)
    assert summary["unknown_bound"] == 0
    assert summary["unsynchronized"] == 0
    assert sum(summary["per_endpoint"].values()) == len(records)
    assert len(summary["per_endpoint"]) == 4
