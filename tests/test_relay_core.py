"""RelayCore: which copies a relay forwards and how each outgoing copy is flagged."""

from __future__ import annotations

from jasper.relay_core import RelayCore
from jasper.wire import Header, decode, encode
from jasper.wire_spec import FLAG_HEARTBEAT, FLAG_HEDGE_COPY


def dgram(seq: int, *, session: int = 1, flags: int = 0, sent: int = 10, epoch: int = 1) -> bytes:
    h = Header(
        stream_id=1, session=session, seq=seq, send_time_ns=sent, deadline_ns=0 if
        flags & FLAG_HEARTBEAT else 99, plan_epoch=epoch, flags=flags,
    )  # fmt: skip
    return encode(h, b"" if flags & FLAG_HEARTBEAT else b"m%d" % seq)


def test_first_copy_forwarded_with_both_flaggings_later_copies_dropped() -> None:
    core = RelayCore(ring_size=16)
    fwd = core.datagram_received(dgram(1, flags=FLAG_HEDGE_COPY, epoch=7), "a")
    assert fwd is not None and fwd.plan_epoch == 7
    assert decode(fwd.own).header.flags == 0
    assert decode(fwd.hedge).header.flags == FLAG_HEDGE_COPY
    assert decode(fwd.own).messages == (b"m1",)
    assert core.datagram_received(dgram(1), "b") is None  # the hedge raced the own copy
    c = core.counters
    assert (c.accepted, c.duplicates, c.stale) == (1, 1, 0)
    assert (dict(c.copies_from), dict(c.kept_from)) == ({"a": 1, "b": 1}, {"a": 1})


def test_stale_sessions_and_window_dropped_new_session_taken() -> None:
    core = RelayCore(ring_size=4)
    assert core.datagram_received(dgram(5, session=2), "a") is not None
    assert core.datagram_received(dgram(1, session=2), "a") is None  # 1 and 5 share a slot
    assert core.datagram_received(dgram(6, session=1), "a") is None  # an older session
    assert core.datagram_received(dgram(1, session=3), "a") is not None  # a restart
    assert (core.counters.accepted, core.counters.stale) == (2, 2)


def test_only_the_newest_heartbeat_is_forwarded() -> None:
    core = RelayCore()
    assert core.datagram_received(dgram(3, flags=FLAG_HEARTBEAT, sent=20), "a") is not None
    assert core.datagram_received(dgram(3, flags=FLAG_HEARTBEAT, sent=20), "b") is None
    assert core.datagram_received(dgram(3, flags=FLAG_HEARTBEAT, sent=15), "b") is None
    assert core.datagram_received(dgram(3, flags=FLAG_HEARTBEAT, sent=30), "b") is not None
    assert (core.counters.heartbeats, core.counters.duplicates) == (2, 2)


def test_malformed_counted_by_reason_never_forwarded() -> None:
    core = RelayCore()
    good = dgram(1)
    for bad in (b"", good[:-1], good[:2] + b"\x01" + good[3:], b"XX" + good[2:]):
        assert core.datagram_received(bad, "x") is None
    assert dict(core.counters.malformed) == {"short": 1, "length": 1, "version": 1, "magic": 1}
    assert not core.counters.copies_from
