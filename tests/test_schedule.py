"""Release schedule: deadline order, bounds, monotone deadlines, rotation among endpoints."""

from __future__ import annotations

import pytest

from jasper.schedule import ReleaseSchedule


def test_releases_in_deadline_order_and_timer_tracks_earliest() -> None:
    s: ReleaseSchedule[str] = ReleaseSchedule(capacity=10, endpoints=1)
    assert s.get_timer() is None
    s.push(deadline_ns=300, stream_id=1, seq=3, endpoint=0, item="c")
    s.push(deadline_ns=100, stream_id=2, seq=1, endpoint=0, item="a")
    s.push(deadline_ns=200, stream_id=2, seq=2, endpoint=0, item="b")
    assert s.get_timer() == 100
    assert s.pop_due(99) == []
    assert [r.item for r in s.pop_due(200)] == ["a", "b"]
    assert s.get_timer() == 300
    assert [r.item for r in s.pop_due(10**9)] == ["c"]
    assert s.counters.released == 3


def test_overflow_is_counted_not_grown() -> None:
    s: ReleaseSchedule[int] = ReleaseSchedule(capacity=2, endpoints=1)
    assert s.push(deadline_ns=1, stream_id=1, seq=1, endpoint=0, item=1)
    assert s.push(deadline_ns=2, stream_id=1, seq=2, endpoint=0, item=2)
    assert not s.push(deadline_ns=3, stream_id=1, seq=3, endpoint=0, item=3)
    assert len(s) == 2 and s.counters.overflow == 1


def test_shrinking_hold_does_not_reorder_a_stream() -> None:
    s: ReleaseSchedule[int] = ReleaseSchedule(capacity=10, endpoints=1)
    s.push(deadline_ns=1000, stream_id=1, seq=1, endpoint=0, item=1)
    # The hold shrank: seq 2's stamped deadline is earlier than seq 1's.
    s.push(deadline_ns=900, stream_id=1, seq=2, endpoint=0, item=2)
    out = s.pop_due(10**9)
    assert [r.seq for r in out] == [1, 2]
    assert out[1].deadline_ns == 1000
    assert s.counters.clamped == 1


def test_endpoints_sharing_a_deadline_rotate_per_message() -> None:
    n = 5
    s: ReleaseSchedule[None] = ReleaseSchedule(capacity=1000, endpoints=n)
    firsts = []
    for seq in range(1, 11):
        for ep in range(n):
            s.push(deadline_ns=seq * 1000, stream_id=1, seq=seq, endpoint=ep, item=None)
        order = [r.endpoint for r in s.pop_due(seq * 1000)]
        assert sorted(order) == list(range(n))
        firsts.append(order[0])
    # Every endpoint goes first equally often over 10 messages.
    assert sorted(firsts) == sorted(list(range(n)) * 2)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ReleaseSchedule(capacity=0, endpoints=1)
    s: ReleaseSchedule[int] = ReleaseSchedule(capacity=1, endpoints=2)
    with pytest.raises(ValueError, match="endpoint"):
        s.push(deadline_ns=1, stream_id=1, seq=1, endpoint=2, item=0)


def test_pop_next_drains() -> None:
    s: ReleaseSchedule[int] = ReleaseSchedule(capacity=3, endpoints=1)
    s.push(deadline_ns=5, stream_id=1, seq=1, endpoint=0, item=7)
    r = s.pop_next()
    assert r is not None and r.item == 7
    assert s.pop_next() is None
