"""ReceiverCore against docs/receiver-core.md: hand-stepped clock, exact releases and counters."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.dedup import AHEAD_RESYNC
from jasper.mp_spec import MP_FLAG_GAP_BEFORE, MP_FLAG_LATE
from jasper.receiver_core import COUNTER_NAMES, CoreRelease, ReceiverCore, ReleaseKind
from jasper.wire import Header, StreamKey, WireError, encode_batch, pack_blocks, sign
from jasper.wire_spec import (
    FLAG_HEARTBEAT,
    FLAG_HEDGE_COPY,
    HEADER_LEN,
    MALFORMED_REASONS,
    MAX_DATAGRAM,
    REJECT_REASONS,
    offsets,
)
from overlay.fastwire import peek

ON_TIME, LATE, UNSTAMPED, OVERFLOW = (
    ReleaseKind.ON_TIME,
    ReleaseKind.LATE,
    ReleaseKind.UNSTAMPED,
    ReleaseKind.OVERFLOW,
)
OFFSETS = offsets()


OPEN_STREAMS = (1, 2, 3)
"""Streams the tests' cores accept without a MAC (set_stream with keys=None)."""


def make(**config: int) -> ReceiverCore:
    """A core that accepts OPEN_STREAMS unauthenticated, following the newest session."""
    core = ReceiverCore(**config)
    for stream in OPEN_STREAMS:
        core.set_stream(stream, keys=None)
    return core


def dgram(
    seq: int,
    *,
    stream: int = 1,
    session: int = 1,
    deadline: int = 0,
    sent: int = 5,
    msgs: tuple[bytes, ...] = (b"m",),
    flags: int = 0,
) -> bytes:
    header = Header(
        stream_id=stream,
        session=session,
        seq=seq,
        send_time_ns=sent,
        deadline_ns=deadline,
        flags=flags,
    )
    return encode_batch(header, () if flags & FLAG_HEARTBEAT else msgs)


def patched(data: bytes, field: str, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, OFFSETS[field], value)
    return bytes(out)


def brief(releases: list[CoreRelease]) -> list[tuple[int, int, int, ReleaseKind, int, int]]:
    """(endpoint, parent, seq, kind, deadline_ns, release_ns) of each release."""
    return [(r.endpoint, r.parent, r.seq, r.kind, r.deadline_ns, r.release_ns) for r in releases]


def counts(core: ReceiverCore, endpoint: int = 0) -> dict[str, int]:
    """The non-zero counters of one endpoint."""
    return {k: v for k, v in core.counters(endpoint).items() if v}


def test_counter_names() -> None:
    expected = (
        "received",
        "heartbeats",
        "accepted",
        "duplicates",
        "stale",
        "released",
        "late",
        "hold_overflow",
        "pending_overflow",
        "gaps",
        "gap_messages",
        *(f"malformed_{r}" for r in MALFORMED_REASONS),
        *(f"rejected_{r}" for r in REJECT_REASONS),
    )
    assert expected == COUNTER_NAMES
    core = make(endpoints=2)
    assert tuple(core.counters(1)) == COUNTER_NAMES
    assert set(core.counters(1).values()) == {0}
    assert core.parents(0) == {}
    assert (core.held, core.pending, core.clamped, core.get_timer()) == (0, 0, 0, None)
    assert core.releases() == []


def test_constructor_is_keyword_only_and_validates() -> None:
    with pytest.raises(TypeError):
        ReceiverCore(3)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        ReceiverCore(endpoints=0)
    with pytest.raises(ValueError):
        ReceiverCore(endpoints=1, ring_size=100)
    with pytest.raises(ValueError):
        ReceiverCore(endpoints=1, hold_capacity=0)


def test_first_copy_in_emulated_time_wins() -> None:
    core = make(endpoints=1)
    d = dgram(1, deadline=1000, sent=7)
    # The kernel hands over parent 1's copy first, but parent 2's arrives first in emulated time.
    core.datagram_received(0, d, 1, 300, 100)
    assert core.get_timer() == 300
    core.datagram_received(0, d, 2, 200, 100)
    assert (core.pending, core.get_timer()) == (2, 200)
    core.timer(200)
    assert core.parents(0) == {2: (1, 1)}
    assert (core.pending, core.held, core.get_timer()) == (1, 1, 300)
    core.timer(300)
    assert core.parents(0) == {1: (1, 0), 2: (1, 1)}
    assert core.get_timer() == 1000
    core.timer(999)
    assert core.releases() == []
    core.timer(1000)
    assert core.releases() == [
        CoreRelease(0, 2, 1, 1, 1, 1, ON_TIME, 1000, 7, 200, 1000, pack_blocks([b"m"]))
    ]
    assert counts(core) == {"received": 2, "accepted": 1, "duplicates": 1, "released": 1}
    assert core.get_timer() is None


def test_same_arrival_keeps_the_copy_handed_in_first() -> None:
    core = make(endpoints=1)
    d = dgram(1)
    core.datagram_received(0, d, 4, 50, 10)
    core.datagram_received(0, d, 3, 50, 10)
    core.timer(60)
    assert brief(core.releases()) == [(0, 4, 1, UNSTAMPED, 0, 60)]
    assert core.parents(0) == {4: (1, 1), 3: (1, 0)}


def test_due_copies_all_processed_in_arrival_order_before_a_new_due_one() -> None:
    core = make(endpoints=1)
    core.datagram_received(0, dgram(1), 1, 150, 100)
    core.datagram_received(0, dgram(2), 1, 120, 100)
    # At 200 both are due, and so is the new copy of seq 1 that arrived at 110: it wins.
    core.datagram_received(0, dgram(1), 2, 110, 200)
    assert brief(core.releases()) == [
        (0, 2, 1, UNSTAMPED, 0, 200),
        (0, 1, 2, UNSTAMPED, 0, 200),
    ]
    assert core.counters(0)["duplicates"] == 1
    assert core.pending == 0


def test_copy_from_the_future_waits_for_its_arrival() -> None:
    core = make(endpoints=1)
    core.datagram_received(0, dgram(1), 9, 500, 100)
    assert core.releases() == []
    assert (core.pending, core.get_timer()) == (1, 500)
    # Not parsed yet: only `received` moved.
    assert counts(core) == {"received": 1}
    assert core.parents(0) == {}
    core.timer(499)
    assert core.releases() == []
    core.timer(500)
    assert brief(core.releases()) == [(0, 9, 1, UNSTAMPED, 0, 500)]
    assert (core.pending, core.get_timer()) == (0, None)


def test_pending_copy_owns_its_bytes() -> None:
    core = make(endpoints=1)
    buf = bytearray(dgram(1, msgs=(b"abc",)))
    core.datagram_received(0, memoryview(buf), 0, 20, 10)
    buf[:] = bytes(len(buf))  # the pump reuses its receive buffer
    core.timer(20)
    (r,) = core.releases()
    assert r.payload == pack_blocks([b"abc"])
    assert type(r.payload) is bytes


def test_pending_overflow() -> None:
    core = make(endpoints=1, pending_capacity=2)
    core.datagram_received(0, dgram(1), 0, 200, 100)
    core.datagram_received(0, dgram(2), 0, 300, 100)
    core.datagram_received(0, dgram(3), 0, 250, 100)  # refused
    assert core.pending == 2
    # A copy already due is never refused.
    core.datagram_received(0, dgram(4), 0, 100, 100)
    assert brief(core.releases()) == [(0, 0, 4, UNSTAMPED, 0, 100)]
    assert counts(core) == {"received": 4, "pending_overflow": 1, "accepted": 1, "released": 1}
    # At 200 seq 1 is due, so only one copy still waits: a future copy fits again, even
    # without a timer call in between.
    core.datagram_received(0, dgram(5), 0, 400, 200)
    assert brief(core.releases()) == [(0, 0, 1, UNSTAMPED, 0, 200)]
    assert (core.pending, core.get_timer()) == (2, 300)
    core.timer(400)
    assert [r.seq for r in core.releases()] == [2, 5]
    assert core.counters(0)["pending_overflow"] == 1
    assert core.counters(0)["released"] == 4


def test_duplicates_stale_and_session_reset() -> None:
    core = make(endpoints=2, ring_size=4)
    feed = [
        (0, dgram(5)),  # accepted
        (0, dgram(5)),  # duplicate
        (0, dgram(0)),  # seq 0: stale
        (0, dgram(9)),  # accepted (slot 1 now holds 9)
        (0, dgram(5)),  # slot 1 holds 9 > 5: stale
        (0, dgram(5, stream=2)),  # another stream, its own ring: accepted
        (1, dgram(5)),  # another endpoint, its own ring: accepted
        (0, dgram(1, session=2)),  # a larger session empties the ring: accepted
        (0, dgram(5, session=2)),  # accepted in the new session
        (0, dgram(10, session=1)),  # the old session: stale
    ]
    for i, (endpoint, d) in enumerate(feed):
        core.datagram_received(endpoint, d, 0, i, i)
    assert counts(core, 0) == {
        "received": 9,
        "accepted": 5,
        "duplicates": 1,
        "stale": 3,
        "released": 5,
        # 9 after 5 skips 6..8; 5 after 1 in session 2 skips 2..4 (gap-before, in release order)
        "gaps": 2,
        "gap_messages": 6,
    }
    assert counts(core, 1) == {"received": 1, "accepted": 1, "released": 1}
    assert [(r.endpoint, r.stream_id, r.session, r.seq) for r in core.releases()] == [
        (0, 1, 1, 5),
        (0, 1, 1, 9),
        (0, 2, 1, 5),
        (1, 1, 1, 5),
        (0, 1, 2, 1),
        (0, 1, 2, 5),
    ]
    assert core.parents(0) == {0: (9, 5)}


def test_heartbeat_is_counted_and_dropped() -> None:
    core = make(endpoints=1)
    core.datagram_received(0, dgram(3, deadline=50, flags=FLAG_HEARTBEAT), 6, 10, 10)
    assert core.releases() == []
    assert counts(core) == {"received": 1, "heartbeats": 1}
    assert core.parents(0) == {6: (1, 0)}
    assert (core.held, core.get_timer()) == (0, None)
    # A heartbeat does not move the dedup ring: the data copy of seq 3 is still accepted.
    core.datagram_received(0, dgram(3), 6, 11, 11)
    assert core.counters(0)["accepted"] == 1


def malformed_samples() -> dict[str, list[bytes]]:
    good = dgram(1, msgs=(b"abc",))
    batch = dgram(1, msgs=(b"a", b"bc"))
    beat = dgram(1, flags=FLAG_HEARTBEAT)
    return {
        "short": [b"", good[: HEADER_LEN - 1]],
        "magic": [patched(good, "magic", "!H", 0x1234)],
        "version": [patched(good, "version", "!B", 1)],
        "flags": [patched(good, "flags", "!B", 0x80)],
        "length": [
            good[:-1],
            good + b"x",
            patched(beat, "payload_len", "!H", 1),
            # Over MAX_DATAGRAM and self-consistent: refused on length before it is stored.
            patched(dgram(1, msgs=(b"",)), "payload_len", "!H", MAX_DATAGRAM - HEADER_LEN + 1)
            + bytes(MAX_DATAGRAM - HEADER_LEN + 1 - 2),
        ],
        "count": [
            patched(good, "msg_count", "!H", 0),  # data without messages
            patched(beat, "msg_count", "!H", 1),  # a heartbeat with messages
            patched(batch, "msg_count", "!H", 1),  # bytes left after the single block
            patched(dgram(1, msgs=(b"a", b"b", b"c")), "msg_count", "!H", 2),
        ],
        "overrun": [
            patched(good, "msg_count", "!H", 2),
            patched(good, "payload_len", "!H", 1)[: HEADER_LEN + 1],
            bytearray_set(good, HEADER_LEN + 1, 200),
            bytearray_set(batch, HEADER_LEN + 4, 9),
        ],
    }


def bytearray_set(data: bytes, at: int, value: int) -> bytes:
    out = bytearray(data)
    out[at] = value
    return bytes(out)


def test_every_malformed_reason() -> None:
    samples = malformed_samples()
    assert set(samples) == set(MALFORMED_REASONS)
    for reason, datagrams in samples.items():
        for d in datagrams:
            with pytest.raises(WireError) as exc:
                peek(d)
            assert exc.value.reason == reason, (reason, d)
            core = make(endpoints=1)
            core.datagram_received(0, d, 3, 10, 10)
            assert counts(core) == {"received": 1, f"malformed_{reason}": 1}, (reason, d)
            assert core.parents(0) == {}
            assert core.releases() == []


def test_oversize_is_refused_on_entry_even_from_the_future() -> None:
    core = make(endpoints=1, pending_capacity=0)
    core.datagram_received(0, dgram(1) + bytes(MAX_DATAGRAM), 0, 500, 100)
    assert counts(core) == {"received": 1, "malformed_length": 1}
    assert (core.pending, core.get_timer()) == (0, None)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.integers(0, 255), st.integers(0, 200), st.integers(0, 200))
def test_malformed_verdict_equals_peek(tail: bytes, byte: int, at: int, cut: int) -> None:
    base = bytearray(dgram(1, msgs=(b"xy", b"", b"z")) + tail)
    base[at % len(base)] = byte
    data = bytes(base[:cut])
    try:
        peek(data)
        expected = None
    except WireError as exc:
        expected = f"malformed_{exc.reason}"
    core = make(endpoints=1)
    core.datagram_received(0, data, 0, 0, 0)
    bad = [k for k, v in counts(core).items() if k.startswith("malformed_")]
    assert bad == ([expected] if expected else [])


def test_late_unstamped_and_hold_overflow() -> None:
    core = make(endpoints=1, hold_capacity=1)
    core.datagram_received(0, dgram(1, deadline=100), 0, 100, 100)  # deadline == now: late
    core.datagram_received(0, dgram(2, deadline=0), 0, 100, 100)
    core.datagram_received(0, dgram(3, deadline=500), 0, 100, 100)  # held
    core.datagram_received(0, dgram(4, deadline=600), 0, 100, 100)  # hold full
    got = core.releases()
    assert brief(got) == [
        (0, 0, 1, LATE, 100, 100),
        (0, 0, 2, UNSTAMPED, 0, 100),
        (0, 0, 4, OVERFLOW, 600, 100),
    ]
    # Late is flagged late; 4 released before 3 has seq 3 missing before it (gap-before).
    assert [r.flags for r in got] == [MP_FLAG_LATE, 0, MP_FLAG_GAP_BEFORE]
    assert (core.held, core.get_timer(), core.clamped) == (1, 500, 0)
    core.timer(500)
    got = core.releases()
    assert brief(got) == [(0, 0, 3, ON_TIME, 500, 500)]
    assert got[0].flags == 0  # out of order, below the next expected: no flag
    assert counts(core) == {
        "received": 4,
        "accepted": 4,
        "released": 4,
        "late": 1,
        "hold_overflow": 1,
        "gaps": 1,
        "gap_messages": 1,
    }


def test_late_copy_is_released_before_the_held_ones_due_in_the_same_call() -> None:
    core = make(endpoints=1)
    core.datagram_received(0, dgram(1, deadline=200), 0, 100, 100)
    core.datagram_received(0, dgram(2, deadline=150), 0, 300, 300)
    assert brief(core.releases()) == [(0, 0, 2, LATE, 150, 300), (0, 0, 1, ON_TIME, 200, 300)]


def test_clamp_keeps_a_stream_in_order() -> None:
    core = make(endpoints=2)
    core.datagram_received(0, dgram(1, deadline=1000), 0, 10, 10)
    core.datagram_received(0, dgram(2, deadline=900), 0, 10, 10)  # raised to 1000
    core.datagram_received(1, dgram(3, deadline=800), 0, 10, 10)  # one floor for the core
    core.datagram_received(0, dgram(1, stream=2, deadline=700), 0, 10, 10)  # another stream
    core.datagram_received(0, dgram(4, deadline=1100), 0, 10, 10)  # the floor moves up
    assert (core.clamped, core.held, core.get_timer()) == (2, 5, 700)
    core.timer(950)
    assert brief(core.releases()) == [(0, 0, 1, ON_TIME, 700, 950)]
    core.timer(1000)
    assert [(r.endpoint, r.stream_id, r.seq, r.deadline_ns) for r in core.releases()] == [
        (0, 1, 1, 1000),
        (0, 1, 2, 1000),
        (1, 1, 3, 1000),
    ]
    assert core.get_timer() == 1100
    # A late copy is neither clamped nor moves the floor.
    core.datagram_received(0, dgram(5, deadline=1050), 0, 1060, 1060)
    core.datagram_received(0, dgram(6, deadline=1200), 0, 1060, 1060)
    assert core.clamped == 2
    core.timer(1200)
    assert brief(core.releases()) == [
        (0, 0, 5, LATE, 1050, 1060),
        (0, 0, 4, ON_TIME, 1100, 1200),
        (0, 0, 6, ON_TIME, 1200, 1200),
    ]


def test_rank_rotates_across_endpoints_with_seq() -> None:
    core = make(endpoints=3)
    for seq in (1, 2, 3, 4):
        for endpoint in (0, 1, 2):
            core.datagram_received(endpoint, dgram(seq, deadline=1000), 0, 10, 10)
    core.timer(1000)
    # rank = (endpoint - seq) % 3: seq 1 starts at endpoint 1, seq 2 at 2, seq 3 at 0.
    assert [(r.seq, r.endpoint) for r in core.releases()] == [
        (1, 1),
        (1, 2),
        (1, 0),
        (2, 2),
        (2, 0),
        (2, 1),
        (3, 0),
        (3, 1),
        (3, 2),
        (4, 1),
        (4, 2),
        (4, 0),
    ]


def test_flush_processes_pending_and_releases_everything() -> None:
    core = make(endpoints=2)
    core.datagram_received(0, dgram(1, deadline=5000), 0, 100, 100)  # held
    core.datagram_received(1, dgram(2, deadline=300), 1, 900, 100)  # pending, late at flush
    core.datagram_received(0, dgram(3, deadline=4000), 2, 800, 100)  # pending, then held
    assert (core.held, core.pending, core.get_timer()) == (1, 2, 800)
    core.flush(500)
    # Pending copies go in arrival order: seq 3 is held (raised to the stream's floor, 5000),
    # then seq 2 is late; then the held ones go in release order.
    assert brief(core.releases()) == [
        (1, 1, 2, LATE, 300, 500),
        (0, 0, 1, ON_TIME, 5000, 500),
        (0, 2, 3, ON_TIME, 5000, 500),
    ]
    assert (core.held, core.pending, core.get_timer(), core.clamped) == (0, 0, None, 1)
    assert counts(core, 0)["released"] == 2
    assert counts(core, 1) == {"received": 1, "accepted": 1, "released": 1, "late": 1}


def test_set_endpoints_grows_only() -> None:
    core = make(endpoints=2)
    with pytest.raises(ValueError):
        core.datagram_received(2, dgram(1), 0, 0, 0)
    with pytest.raises(ValueError):
        core.counters(2)
    with pytest.raises(ValueError):
        core.parents(-1)
    with pytest.raises(ValueError):
        core.datagram_received(0, dgram(1), 2**32, 0, 0)
    with pytest.raises(ValueError):
        core.set_endpoints(1)
    core.set_endpoints(2)
    core.set_endpoints(3)
    assert core.endpoints == 3
    assert set(core.counters(2).values()) == {0}
    # Ranks use the endpoint count as set now: seq 1 starts at endpoint 1 among three.
    for endpoint in (0, 1, 2):
        core.datagram_received(endpoint, dgram(1, deadline=100), 0, 10, 10)
    core.timer(100)
    assert [r.endpoint for r in core.releases()] == [1, 2, 0]
    assert core.counters(2)["released"] == 1


def test_batches_count_messages() -> None:
    core = make(endpoints=1)
    msgs = (b"a", b"bb", b"")
    core.datagram_received(0, dgram(10, deadline=500, msgs=msgs), 0, 100, 100)
    core.datagram_received(0, dgram(13, deadline=50, msgs=msgs[:2]), 0, 100, 100)
    core.datagram_received(0, dgram(15, msgs=msgs), 0, 100, 100)
    core.timer(500)
    releases = core.releases()
    assert [(r.seq, r.count, r.kind) for r in releases] == [
        (13, 2, LATE),
        (15, 3, UNSTAMPED),
        (10, 3, ON_TIME),
    ]
    assert releases[2].payload == pack_blocks(msgs)
    assert counts(core) == {"received": 3, "accepted": 3, "released": 8, "late": 2}


def test_parents_per_endpoint() -> None:
    core = make(endpoints=2)
    d = dgram(1)
    core.datagram_received(0, d, 7, 0, 0)
    core.datagram_received(0, d, 8, 1, 1)
    core.datagram_received(0, d, 7, 2, 2)
    core.datagram_received(1, d, 8, 3, 3)
    core.datagram_received(1, b"junk", 9, 4, 4)  # malformed: no parent entry
    assert core.parents(0) == {7: (2, 1), 8: (1, 0)}
    assert core.parents(1) == {8: (1, 1)}


KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))


def signed(seq: int, key: StreamKey, **kw: Any) -> bytes:
    return sign(dgram(seq, **kw), key)


def test_a_stream_never_set_is_refused_before_anything_is_remembered() -> None:
    core = make(endpoints=1)
    core.datagram_received(0, dgram(1, stream=9), 4, 10, 10)
    assert counts(core) == {"received": 1, "rejected_stream": 1}
    assert core.parents(0) == {}
    core.set_stream(9, keys=None)
    core.datagram_received(0, dgram(1, stream=9), 4, 10, 10)
    assert counts(core)["accepted"] == 1
    core.drop_stream(9)
    core.datagram_received(0, dgram(2, stream=9), 4, 10, 10)
    assert counts(core)["rejected_stream"] == 2


def test_a_keyed_stream_takes_only_copies_with_a_good_mac() -> None:
    core = make(endpoints=1)
    a = StreamKey(1, KEY_A)
    core.set_stream(5, keys={1: KEY_A})
    good = signed(1, a, stream=5, deadline=100)
    tampered = bytearray(good)
    tampered[-1] ^= 1  # a payload byte
    moved = patched(good, "deadline_ns", "!Q", 50)  # an earlier release time
    for data in (
        dgram(2, stream=5),  # unsigned: key epoch 0
        signed(3, StreamKey(2, KEY_A), stream=5),  # an epoch the core holds no key of
        signed(4, StreamKey(1, KEY_B), stream=5),  # the wrong key
        bytes(tampered),
        moved,
    ):
        core.datagram_received(0, data, 1, 10, 10)
    assert counts(core) == {
        "received": 5,
        "rejected_key": 2,
        "rejected_mac": 3,
    }
    assert core.parents(0) == {}
    core.datagram_received(0, good, 1, 10, 10)
    # A relay's hedge copy differs in the hedge flag only, which the MAC leaves out.
    hedge = patched(good, "flags", "!B", FLAG_HEDGE_COPY)
    core.datagram_received(0, hedge, 2, 11, 11)
    assert counts(core)["accepted"] == 1
    assert counts(core)["duplicates"] == 1
    core.timer(100)
    assert [(r.seq, r.parent, r.kind) for r in core.releases()] == [(1, 1, ON_TIME)]


def test_a_duplicate_of_a_kept_copy_is_dropped_without_hashing() -> None:
    """At H=2 two copies in three are duplicates: once (session, seq) is kept, later copies of
    it are dropped as duplicates before the MAC (they move no state and release nothing), a
    forged one included (a MAC check would have counted it under mac); a forgery of a seq not
    yet kept is still refused by MAC."""
    core = make(endpoints=1)
    a = StreamKey(1, KEY_A)
    core.set_stream(5, keys={1: KEY_A})
    good = signed(1, a, stream=5, deadline=100)
    hedge = patched(good, "flags", "!B", FLAG_HEDGE_COPY)
    forged_dup = signed(1, StreamKey(1, KEY_B), stream=5, deadline=100)
    forged_new = signed(2, StreamKey(1, KEY_B), stream=5, deadline=100)
    for parent, data in enumerate((good, hedge, forged_dup, forged_new), start=1):
        core.datagram_received(0, data, parent, 10, 10)
    assert counts(core) == {
        "received": 4,
        "accepted": 1,
        "duplicates": 2,
        "rejected_mac": 1,
    }
    assert core.parents(0) == {1: (1, 1), 2: (1, 0), 3: (1, 0)}
    core.timer(100)
    assert [(r.seq, r.parent) for r in core.releases()] == [(1, 1)]


def test_keys_rotate_with_two_epochs_valid_during_the_switch() -> None:
    core = make(endpoints=1)
    a, b = StreamKey(1, KEY_A), StreamKey(2, KEY_B)
    core.set_stream(5, keys={1: KEY_A})
    core.datagram_received(0, signed(1, a, stream=5), 0, 10, 10)
    core.set_stream(5, keys={1: KEY_A, 2: KEY_B})  # make: both valid
    core.datagram_received(0, signed(2, a, stream=5), 0, 10, 10)
    core.datagram_received(0, signed(3, b, stream=5), 0, 10, 10)
    core.set_stream(5, keys={2: KEY_B})  # break: the old epoch retires
    core.datagram_received(0, signed(4, a, stream=5), 0, 10, 10)
    core.datagram_received(0, signed(5, b, stream=5), 0, 10, 10)
    assert [r.seq for r in core.releases()] == [1, 2, 3, 5]
    assert counts(core)["rejected_key"] == 1


def test_only_the_announced_session_is_taken() -> None:
    core = make(endpoints=1)
    core.set_stream(5, keys=None, session=7)
    core.datagram_received(0, dgram(1, stream=5, session=8), 0, 10, 10)  # newer, not announced
    core.datagram_received(0, dgram(1, stream=5, session=6), 0, 10, 10)
    core.datagram_received(0, dgram(1, stream=5, session=7), 0, 10, 10)
    core.datagram_received(0, dgram(2, stream=5, session=7), 0, 10, 10)
    assert counts(core)["rejected_session"] == 2
    assert [r.seq for r in core.releases()] == [1, 2]
    core.set_stream(5, keys=None, session=8)  # the control plane announces the new session
    core.datagram_received(0, dgram(1, stream=5, session=8), 0, 10, 10)
    core.datagram_received(0, dgram(3, stream=5, session=7), 0, 10, 10)
    assert [(r.session, r.seq) for r in core.releases()] == [(8, 1)]
    assert counts(core)["rejected_session"] == 3


def test_a_far_ahead_seq_moves_no_state_until_the_jump_persists() -> None:
    core = make(endpoints=1, ahead_window=16, ring_size=8)
    core.datagram_received(0, dgram(1), 0, 10, 10)
    # 1 + 16 is the edge of the window; 18 lies beyond it.
    core.datagram_received(0, dgram(18), 0, 10, 10)
    core.datagram_received(0, dgram(17), 0, 10, 10)
    assert counts(core)["rejected_ahead"] == 1
    # 18 did not claim its slot (18 & 7 == 2): seq 2 is still accepted.
    core.datagram_received(0, dgram(2), 0, 10, 10)
    assert [r.seq for r in core.releases()] == [1, 17, 2]
    # A real jump (this host was cut off): after AHEAD_RESYNC copies in a row it is taken.
    far = [1000 + i for i in range(AHEAD_RESYNC)]
    for seq in far:
        core.datagram_received(0, dgram(seq), 0, 10, 10)
    assert counts(core)["rejected_ahead"] == AHEAD_RESYNC
    assert [r.seq for r in core.releases()] == [far[-1]]
    core.datagram_received(0, dgram(far[-1] + 1), 0, 10, 10)
    assert [r.seq for r in core.releases()] == [far[-1] + 1]


def test_set_stream_validates() -> None:
    core = make(endpoints=1)
    for bad in (
        {"keys": {1: b"short"}},
        {"keys": {0: KEY_A}},
        {"keys": None, "session": -1},
        {"keys": None, "session": 2**32},
    ):
        with pytest.raises(ValueError):
            core.set_stream(5, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        core.set_stream(2**32, keys=None)
    with pytest.raises(ValueError):
        make(endpoints=1, ahead_window=0)
