"""RelayCore: which copies a relay forwards and how each outgoing copy is flagged."""

from __future__ import annotations

from jasper.relay_core import RelayCore as _RelayCore
from jasper.wire import Header, StreamKey, decode, encode, mac_matches
from jasper.wire_spec import FLAG_HEARTBEAT, FLAG_HEDGE_COPY

KEY = StreamKey(3, bytes(range(32)))


def dgram(
    seq: int,
    *,
    session: int = 1,
    flags: int = 0,
    sent: int = 10,
    epoch: int = 1,
    stream: int = 1,
    key: StreamKey | None = None,
) -> bytes:
    h = Header(
        stream_id=stream, session=session, seq=seq, send_time_ns=sent, deadline_ns=0 if
        flags & FLAG_HEARTBEAT else 99, plan_epoch=epoch, flags=flags,
    )  # fmt: skip
    return encode(h, b"" if flags & FLAG_HEARTBEAT else b"m%d" % seq, key=key)


def RelayCore(**config: int) -> _RelayCore:
    """A core that forwards stream 1 unauthenticated, as a lab topology without keys."""
    core = _RelayCore(**config)
    core.set_stream(1, keys=None)
    return core


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


def test_a_keyed_stream_forwards_only_authentic_copies_and_keeps_the_mac_valid() -> None:
    core = RelayCore()
    core.set_stream(2, keys={KEY.epoch: KEY.key})
    forged = [
        dgram(1, stream=2),  # unsigned
        dgram(1, stream=2, key=StreamKey(3, bytes(32))),  # the wrong key
        dgram(1, stream=2, key=StreamKey(4, KEY.key)),  # an epoch not held
        dgram(1, stream=9, key=KEY),  # a stream this relay is not in
    ]
    for data in forged:
        assert core.datagram_received(data, "x") is None
    assert dict(core.counters.rejected) == {"mac": 1, "key": 2, "stream": 1}
    assert not core.counters.copies_from
    fwd = core.datagram_received(dgram(1, stream=2, key=KEY), "a")
    assert fwd is not None
    # Flagging a hedge copy leaves the MAC valid for the receivers below.
    assert mac_matches(fwd.hedge, {KEY.epoch: KEY.key}) is None
    assert mac_matches(fwd.own, {KEY.epoch: KEY.key}) is None


def test_an_announced_session_and_the_window_ahead_bound_what_moves_state() -> None:
    core = RelayCore()
    core.set_stream(1, keys=None, session=5)
    assert core.datagram_received(dgram(1, session=6), "a") is None
    assert core.datagram_received(dgram(1, session=5), "a") is not None
    assert core.datagram_received(dgram(1 + (1 << 21), session=5), "a") is None
    assert core.datagram_received(dgram(2, session=5), "a") is not None
    assert dict(core.counters.rejected) == {"session": 1, "ahead": 1}


def test_streams_of_one_relay_keep_separate_state_and_one_can_be_dropped() -> None:
    core = RelayCore()
    core.set_stream(2, keys=None)
    one = core.datagram_received(dgram(1, stream=1), "a")
    two = core.datagram_received(dgram(1, stream=2), "a")
    # The same (session, seq) in two streams is two messages, each forwarded by its stream.
    assert one is not None and one.stream_id == 1
    assert two is not None and two.stream_id == 2
    assert core.datagram_received(dgram(2, stream=1), "a") is not None
    core.drop_stream(2)
    assert core.streams() == [1]
    assert core.datagram_received(dgram(2, stream=2), "a") is None
    # Stream 1 kept its dedup state: its seen copies are still duplicates.
    assert core.datagram_received(dgram(2, stream=1), "b") is None
    assert core.datagram_received(dgram(3, stream=1), "b") is not None
    assert dict(core.counters.rejected) == {"stream": 1}
    assert core.counters.duplicates == 1
