"""PreciseRelease: on time, in order, rotating endpoints, late joiners, draining at stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from jasper.schedule import Release
from overlay.release import PreciseRelease


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[int, int, int, int]] = []  # (seq, endpoint, deadline, handed at)
        self.lock = threading.Lock()

    def __call__(self, batch: Sequence[Release[int]]) -> None:
        now = time.time_ns()
        with self.lock:
            self.got.extend((r.seq, r.endpoint, r.deadline_ns, now) for r in batch)


def wait_for(sink: Sink, n: int, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while len(sink.got) < n and time.monotonic() < end:
        time.sleep(0.005)


def test_released_in_deadline_order_never_early_and_rotating() -> None:
    sink = Sink()
    pr: PreciseRelease[int] = PreciseRelease(endpoints=4, deliver=sink, realtime=False)
    pr.start()
    try:
        base = time.time_ns() + 20_000_000
        # Pushed out of order: seq 2 has the earlier deadline.
        for e in range(4):
            pr.hold(deadline_ns=base + 5_000_000, stream_id=1, seq=1, endpoint=e, item=0)
        for e in range(4):
            pr.hold(deadline_ns=base, stream_id=2, seq=2, endpoint=e, item=0)
        wait_for(sink, 8)
    finally:
        pr.stop()
    assert [s for s, *_ in sink.got] == [2, 2, 2, 2, 1, 1, 1, 1]
    assert all(at >= deadline for _, _, deadline, at in sink.got)
    # Endpoints sharing a deadline come out in an order that rotates with the sequence number.
    assert [e for s, e, *_ in sink.got if s == 2] == [2, 3, 0, 1]
    assert [e for s, e, *_ in sink.got if s == 1] == [1, 2, 3, 0]
    assert pr.batches == 2 and pr.errors == 0


def test_an_entry_arriving_after_the_batch_was_prepared_joins_it() -> None:
    sink = Sink()
    pr: PreciseRelease[int] = PreciseRelease(
        endpoints=2, deliver=sink, realtime=False, prepare_ns=30_000_000, spin_ns=100_000
    )
    pr.start()
    try:
        deadline = time.time_ns() + 40_000_000
        pr.hold(deadline_ns=deadline, stream_id=1, seq=1, endpoint=0, item=0)
        time.sleep(0.02)  # the thread has taken endpoint 0's entry out by now
        pr.hold(deadline_ns=deadline, stream_id=1, seq=1, endpoint=1, item=0)
        wait_for(sink, 2)
    finally:
        pr.stop()
    assert sorted(e for _, e, *_ in sink.got) == [0, 1]
    assert pr.batches == 1  # one hand-over at the deadline, not a late second batch
    assert all(at >= deadline for *_, at in sink.got)


def test_stop_drains_on_time_or_at_once() -> None:
    sink = Sink()
    pr: PreciseRelease[int] = PreciseRelease(endpoints=1, deliver=sink, realtime=False)
    pr.start()
    deadline = time.time_ns() + 30_000_000
    pr.hold(deadline_ns=deadline, stream_id=1, seq=1, endpoint=0, item=0)
    pr.stop(drain=True, timeout=2.0)
    assert len(sink.got) == 1 and sink.got[0][3] >= deadline  # waited for the deadline

    sink2 = Sink()
    pr2: PreciseRelease[int] = PreciseRelease(endpoints=1, deliver=sink2, realtime=False)
    pr2.start()
    pr2.hold(deadline_ns=time.time_ns() + 10**10, stream_id=1, seq=1, endpoint=0, item=0)
    t = time.monotonic()
    pr2.stop(drain=True, timeout=0.2)  # too far ahead: handed over at once after the timeout
    assert len(sink2.got) == 1 and time.monotonic() - t < 2.0


def test_a_failing_delivery_is_counted_and_the_thread_survives() -> None:
    calls: list[int] = []

    def deliver(batch: Sequence[Release[int]]) -> None:
        calls.append(batch[0].seq)
        if batch[0].seq == 1:
            raise RuntimeError("boom")

    pr: PreciseRelease[int] = PreciseRelease(endpoints=1, deliver=deliver, realtime=False)
    pr.start()
    try:
        now = time.time_ns()
        pr.hold(deadline_ns=now + 5_000_000, stream_id=1, seq=1, endpoint=0, item=0)
        pr.hold(deadline_ns=now + 10_000_000, stream_id=1, seq=2, endpoint=0, item=0)
        end = time.monotonic() + 5
        while len(calls) < 2 and time.monotonic() < end:
            time.sleep(0.005)
    finally:
        pr.stop()
    assert calls == [1, 2] and pr.errors == 1
