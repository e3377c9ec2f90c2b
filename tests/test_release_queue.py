"""The C release thread (overlay/releasec.py): order, timing floor, overflow, drain and drop."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from overlay.releasec import ReleaseQueue, release_queue, sockaddr


@pytest.fixture()
def sink() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    yield s
    s.close()


@pytest.fixture()
def out() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield s
    s.close()


def make(capacity: int = 64) -> tuple[ReleaseQueue, int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    q = release_queue(capacity=capacity, spin_ns=50_000, priority=0, notify_fd=fd)
    assert q is not None, "the C release routine must build here (cc is a dependency)"
    return q, fd


def push(q: ReleaseQueue, out: socket.socket, sink: socket.socket, **kw: int) -> int:
    token = kw.pop("token")
    return q.push(
        token=token,
        fd=out.fileno(),
        addr=sockaddr(socket.AF_INET, sink.getsockname()),
        payload=b"m%d" % token,
        **kw,
    )


def take_all(q: ReleaseQueue, n: int, timeout_s: float = 5.0) -> list[tuple[int, int, int]]:
    got: list[tuple[int, int, int]] = []
    end = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < end:
        got.extend(q.take())
        time.sleep(0.005)
    return got


def test_sends_in_deadline_stream_seq_rank_order_never_early(
    sink: socket.socket, out: socket.socket
) -> None:
    q, fd = make()
    try:
        base = time.time_ns() + 30_000_000
        # Pushed out of order: (deadline offset, seq, rank, token).
        entries = [
            (2, 2, 1, 5),
            (0, 1, 2, 2),
            (2, 2, 0, 4),
            (0, 1, 0, 0),
            (0, 1, 1, 1),
            (1, 9, 0, 3),
        ]
        for d, seq, rank, token in entries:
            deadline = base + d * 5_000_000
            assert push(q, out, sink, deadline_ns=deadline, stream_id=1, seq=seq, rank=rank,
                        token=token) == 0  # fmt: skip
        got = take_all(q, len(entries))
        assert [t for t, _, _ in got] == [0, 1, 2, 3, 4, 5]
        assert all(err == 0 for _, _, err in got)
        deadlines = {t: base + d * 5_000_000 for d, _, _, t in entries}
        assert all(stamp >= deadlines[t] for t, stamp, _ in got)  # never before the deadline
        assert [sink.recv(64) for _ in entries] == [b"m%d" % t for t in range(6)]
        assert os.eventfd_read(fd) >= 1  # the loop was woken
        c = q.counters()
        assert (c["pushed"], c["sent"], c["failed"], c["held"]) == (6, 6, 0, 0)
    finally:
        q.close()
        os.close(fd)


def test_deadlines_nanoseconds_apart_share_one_batch_and_none_goes_early(
    sink: socket.socket, out: socket.socket
) -> None:
    # One message's copies whose deadlines differ by a few ns (a node clock converted to the
    # kernel's), and a second message 15 µs later: one wake-up, each sent at its own deadline.
    q, fd = make()
    try:
        base = time.time_ns() + 30_000_000
        deadlines = {t: base + 7 * t for t in range(10)}
        deadlines[10] = base + 15_000
        for t, deadline in deadlines.items():
            assert push(q, out, sink, deadline_ns=deadline, stream_id=1, seq=1 + t // 10, rank=t,
                        token=t) == 0  # fmt: skip
        got = take_all(q, len(deadlines))
        assert [t for t, _, _ in got] == list(range(11))
        assert all(stamp >= deadlines[t] for t, stamp, _ in got)
        c = q.counters()
        assert (c["sent"], c["batches"]) == (11, 1)
    finally:
        q.close()
        os.close(fd)


def test_full_queue_refuses_and_counts(sink: socket.socket, out: socket.socket) -> None:
    q, fd = make(capacity=4)
    try:
        far = time.time_ns() + 60_000_000_000
        codes = [
            push(q, out, sink, deadline_ns=far, stream_id=1, seq=i, rank=0, token=i)
            for i in range(6)
        ]
        assert codes == [0, 0, 0, 0, -1, -1]
        assert q.counters()["overflow"] == 2
        assert q.stop(drain=False, timeout_s=1.0) == 4  # dropped, none sent
        assert q.take() == []
    finally:
        q.close()
        os.close(fd)


def test_stop_with_drain_sends_everything_held(sink: socket.socket, out: socket.socket) -> None:
    q, fd = make()
    try:
        soon = time.time_ns() + 20_000_000
        far = time.time_ns() + 60_000_000_000
        assert push(q, out, sink, deadline_ns=soon, stream_id=1, seq=1, rank=0, token=1) == 0
        assert push(q, out, sink, deadline_ns=far, stream_id=1, seq=2, rank=0, token=2) == 0
        # The first goes on time; after the timeout the far one is sent at once.
        assert q.stop(drain=True, timeout_s=0.5) == 0
        got = q.take()
        assert [t for t, _, _ in got] == [1, 2]
        assert got[0][1] >= soon and got[1][1] < far
        assert push(q, out, sink, deadline_ns=soon, stream_id=1, seq=3, rank=0, token=3) == -2
    finally:
        q.close()
        q.close()  # idempotent
        os.close(fd)


def test_send_errors_are_reported_per_datagram(sink: socket.socket) -> None:
    q, fd = make()
    try:
        # A closed socket's fd: the send fails with EBADF and says so, nothing crashes.
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        bad_fd = dead.fileno()
        dead.close()
        now = time.time_ns() + 5_000_000
        addr = sockaddr(socket.AF_INET, sink.getsockname())
        assert q.push(deadline_ns=now, stream_id=1, seq=1, rank=0, token=7, fd=bad_fd,
                      addr=addr, payload=b"x") == 0  # fmt: skip
        assert q.push(deadline_ns=now, stream_id=1, seq=1, rank=0, token=8, fd=3,
                      addr=b"\0" * 200, payload=b"x") == -2  # fmt: skip
        got = take_all(q, 1)
        assert got and got[0][0] == 7 and got[0][2] != 0
        assert q.counters()["failed"] == 1
    finally:
        q.close()
        os.close(fd)
