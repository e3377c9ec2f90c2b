"""The data plane on emulated skewed clocks: a real publisher, relay and receiver on loopback,
node clocks corrected by SNTP against a real chronyd, the audit log written from deliveries."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jasper.audit import decode_records, summarize
from jasper.clockbound import ClockStatus
from jasper.owd import OwdCollector
from jasper.topology import parse_topology
from jasper_cli.main import main as jasper_main
from overlay.audit_log import AuditLogWriter, ReleaseAuditor
from overlay.clocks import SoftwareClock
from overlay.clocksync import ClockDiscipline
from overlay.refclock import ChronyConfig, ReferenceChrony, chronyd_path
from tests.conftest import require_privileged

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

ENDPOINTS = 4
HOLD_NS = 20_000_000
"""Generous, so that even on a loaded 2-core machine copies arrive before their deadline."""
RATE = 200.0
SECONDS = 2.0


@pytest.fixture(scope="module")
def reference() -> Iterator[ReferenceChrony]:
    require_privileged("chronyd", chronyd_path() is not None)
    ref = ReferenceChrony(ChronyConfig(exit_after_s=600))
    ref.start()
    try:
        yield ref
    finally:
        ref.cleanup()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _topology() -> Any:
    names = [f"e{i}" for i in range(ENDPOINTS)]
    return parse_topology(
        {
            "version": 1,
            "stream": {"id": 1, "name": "book", "hedge": 0, "hold_ns": HOLD_NS},
            "publisher": {"name": "pub", "addr": "127.0.0.1", "targets": ["r0"]},
            "relays": [
                {
                    "name": "r0",
                    "addr": "127.0.0.1",
                    "port": _free_port(),
                    "targets": [{"node": n} for n in names],
                }
            ],
            "receivers": [
                {
                    "name": "h0",
                    "addr": "127.0.0.1",
                    "endpoints": [
                        {"name": n, "port": _free_port(), "parents": ["r0"]} for n in names
                    ],
                }
            ],
        }
    )


async def _run(ref: ReferenceChrony, *, correct: bool, audit: Path | None) -> dict[str, Any]:
    from overlay.publisher import Publisher
    from overlay.receiver import Receiver
    from overlay.relay import Relay

    topo = _topology()
    pub_clock = SoftwareClock(offset_ns=500_000, drift_ppm=20.0, name="pub")
    rx_clock = SoftwareClock(offset_ns=-500_000, drift_ppm=-20.0, name="h0")
    discs = [
        ClockDiscipline(
            clock=c, server=("127.0.0.1", ref.ntp_port), interval_s=0.25, correct=correct
        )
        for c in (pub_clock, rx_clock)
    ]
    for d in discs:
        if correct:
            await d.sync_once()
        d.start()
    loop = asyncio.get_running_loop()
    # As the daemons do (tune_interpreter): a 5 ms GIL switch interval would hold releases
    # behind the event loop. Restored afterwards for the rest of the test session.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(50e-6)
    relay = Relay(topo, ["r0"], link_model=False)
    rx = Receiver(
        topo,
        "h0",
        link_model=False,
        clock=rx_clock.now_ns,
        synced=lambda: rx_clock.status() is ClockStatus.SYNCHRONIZED,
        realtime=True,  # SCHED_FIFO release thread, as the receiver daemon runs it
        deliver=None,
    )
    pub = Publisher(topo, clock=pub_clock.now_ns, hold_ns=HOLD_NS)
    auditor = (
        ReleaseAuditor(
            AuditLogWriter(
                audit,
                node="h0",
                endpoints=[ep.name for ep in rx.endpoints],
                clock_source=f"sntp 127.0.0.1:{ref.ntp_port}",
            ),
            rx_clock,
        )
        if audit is not None
        else None
    )
    pub_bounds: list[int] = []
    rx_bounds: list[int] = []

    async def consume(ep_index: int, name: str) -> None:
        async for d in rx.messages(name):
            # The receiver stamps releases with the kernel clock; replay what the node's
            # clock read and claimed at that instant.
            b = rx_clock.bound_then(d.release_ns)
            reading = rx_clock.reading_then(d.release_ns)
            if b.status is not ClockStatus.UNKNOWN:
                rx_bounds.append(b.bound_ns(reading))
            if auditor is not None:
                auditor.on_release(
                    endpoint=ep_index, stream_id=d.stream_id, seq=d.seq,
                    deadline_ns=d.deadline_ns, release_true_ns=d.release_ns, late=d.late,
                )  # fmt: skip

    async def watch_pub_bound() -> None:
        while True:
            b = pub_clock.bound()
            if b.status is not ClockStatus.UNKNOWN:
                pub_bounds.append(b.bound_ns(pub_clock.now_ns()))
            await asyncio.sleep(0.01)

    consumers = [loop.create_task(consume(ep.index, ep.name)) for ep in rx.endpoints] + [
        loop.create_task(watch_pub_bound())
    ]
    try:
        relay.start(loop)
        rx.start(loop)
        await asyncio.sleep(0.05)
        sent = await pub.run(rate=RATE, duration_s=SECONDS)
        await asyncio.sleep(HOLD_NS / 1e9 + 0.1)
        rx.stop()
        await asyncio.sleep(0.05)
    finally:
        for t in consumers:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for d in discs:
            await d.stop()
        pub.close()
        relay.close()
        rx.close()
        if auditor is not None:
            auditor.close()
        sys.setswitchinterval(switch_interval)
    # One-way delays as the endpoints measure them: arrival on the receiver's clock (the
    # kernel stamp replayed through it) minus the send time the publisher's clock stamped.
    records = rx.records.array()
    owd = OwdCollector(window_samples=10_000, window_ns=10**12)  # one window each
    for name, arrival, deadline in zip(
        records["endpoint"].tolist(), records["arrival_ns"].tolist(),
        records["deadline_ns"].tolist(), strict=True,
    ):  # fmt: skip
        reading = rx_clock.reading_then(arrival)
        owd.record(
            endpoint=int(name[1:]), stream_id=1, send_ns=deadline - HOLD_NS, arrival_ns=reading,
            deadline_ns=deadline, now_ns=reading,
        )  # fmt: skip
    (owd_report,) = owd.drain(rx_clock.now_ns(), close_open=True)
    return {
        "sent": sent,
        "owd": owd_report,
        "records": records,
        "status": rx.status(),
        "rx_clock": rx_clock,
        "pub_bound_max": max(pub_bounds, default=0),
        "rx_bound_max": max(rx_bounds, default=0),
    }


async def test_releases_on_corrected_clocks_land_on_true_deadline(
    reference: ReferenceChrony, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = tmp_path / "h0.audit"
    out = await _run(reference, correct=True, audit=audit)
    recs = out["records"]
    assert out["sent"] > 0
    assert len(recs) == out["sent"] * ENDPOINTS, "every message at every endpoint"
    assert recs["synced"].all()
    clock: SoftwareClock = out["rx_clock"]
    assert 0 < out["rx_bound_max"] < 300_000 and 0 < out["pub_bound_max"] < 300_000
    for release, deadline in zip(
        recs["release_ns"].tolist(), recs["deadline_ns"].tolist(), strict=True
    ):
        reading = clock.reading_then(release)
        true_error = release - deadline
        node_lateness = reading - deadline  # what the receiver itself saw (its release path)
        bound = clock.bound_then(release)
        assert bound.status is ClockStatus.SYNCHRONIZED
        # The rest of the true release error is the receiver's clock error: inside its bound.
        assert abs(true_error - node_lateness) <= bound.bound_ns(reading)

    owd = out["owd"]
    assert owd.reporters == ENDPOINTS and owd.count == len(recs)
    # On corrected clocks the measured delays are real loopback delays: positive (a delay
    # shorter than the two clocks' residual errors could still measure below zero).
    assert owd.negative <= 0.05 * owd.count and owd.p50_ns > 0

    header, arr, tail = decode_records(audit.read_bytes())
    assert tail == 0 and len(arr) == len(recs)
    s = summarize([(header, arr, tail)])
    assert s.unsynchronized == 0 and s.unknown_bound == 0
    assert s.bound.max <= out["rx_bound_max"] + 1
    rc = jasper_main(["audit", str(audit), "--threshold-us", "400"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"releases            {len(recs)} in 1 file(s), {ENDPOINTS} endpoints" in text


async def test_negative_control_releases_off_by_the_injected_offset(
    reference: ReferenceChrony,
) -> None:
    out = await _run(reference, correct=False, audit=None)
    recs = out["records"]
    clock: SoftwareClock = out["rx_clock"]
    assert len(recs) == out["sent"] * ENDPOINTS
    assert not recs["synced"].any(), "an uncorrected clock says it is not synchronized"
    error = (recs["release_ns"] - recs["deadline_ns"]).astype(np.int64)
    # The receiver's clock runs 500 µs (and 20 ppm) behind, so it releases that much late.
    injected = np.array([t - clock.reading_then(t) for t in recs["release_ns"].tolist()])
    assert float(np.median(injected)) >= 480_000
    # Copies that arrived (on the node's clock) after their deadline went out at once: their
    # lateness is the event loop's, not the clock's. The rest went out when the node's clock
    # reached the deadline: what remains beyond the injected offset is the release thread's.
    on_time = np.array(
        [clock.reading_then(a) <= d for a, d in zip(recs["arrival_ns"].tolist(),
                                                     recs["deadline_ns"].tolist(), strict=True)]
    )  # fmt: skip
    assert on_time.mean() > 0.5
    residual = (error - injected)[on_time]
    assert abs(float(np.median(residual))) < 200_000
    assert float(np.median(error)) > 400_000
    # Uncorrected, the endpoints' delays are off by the relative skew: the receiver runs
    # 500 µs behind and the publisher 500 µs ahead, so most delays measure ~1 ms negative.
    owd = out["owd"]
    assert owd.count == len(recs) and owd.negative > 0.5 * owd.count and owd.p50_ns == 0
