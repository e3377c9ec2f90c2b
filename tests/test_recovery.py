"""Loss recovery inside the hold (docs/recovery.md): the NAK wire format, the receiver's NAK
schedule, the publisher's retransmit buffer, and a receiver core and a buffer wired together in
memory with a hand-stepped clock (the aioquic way)."""

from __future__ import annotations

import pytest

from jasper.mp_spec import MP_FLAG_GAP_BEFORE, MP_FLAG_LATE, MP_FLAG_RECOVERED
from jasper.receiver_core import ReceiverCore, ReleaseKind
from jasper.recovery import NakTracker, RecoveryConfig, RetransmitBuffer, jitter_ns
from jasper.wire import (
    Header,
    NakRange,
    StreamKey,
    WireError,
    decode,
    decode_nak,
    encode_batch,
    encode_nak,
    mac_matches,
    peek,
)
from jasper.wire_spec import (
    FLAG_NAK,
    FLAG_RETRANSMIT,
    HEADER_LEN,
    MAX_NAK_COUNT,
    NAK_RANGE_LEN,
    offsets,
)

KEY = StreamKey(1, bytes(range(32)))
CFG = RecoveryConfig(nak_delay_ns=100, nak_jitter_ns=50, retry_ns=1000, attempts=3, seed=7)
HOLD = 10_000


def data(seq: int, *, send: int = 0, msgs: int = 1, session: int = 1) -> bytes:
    header = Header(
        stream_id=1, session=session, seq=seq, send_time_ns=send, deadline_ns=send + HOLD
    )
    return encode_batch(header, [b"m%d" % (seq + i) for i in range(msgs)], key=KEY)


# --- the NAK datagram ---------------------------------------------------------------------


def test_nak_round_trip_layout_and_mac() -> None:
    nak = encode_nak(
        stream_id=9, session=4, ranges=[NakRange(5, 3), NakRange(11, 1, 2)], send_time_ns=77,
        key=KEY,
    )  # fmt: skip
    assert len(nak) == HEADER_LEN + 2 * NAK_RANGE_LEN
    assert nak[offsets()["flags"]] == FLAG_NAK
    got = decode_nak(nak)
    assert (got.stream_id, got.session, got.send_time_ns, got.key_epoch) == (9, 4, 77, 1)
    assert got.ranges == (NakRange(5, 3, 1), NakRange(11, 1, 2))
    assert mac_matches(nak, {1: KEY.key}) is None
    forged = bytearray(nak)
    forged[-5] ^= 1  # a range's count
    assert mac_matches(bytes(forged), {1: KEY.key}) == "mac"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[:10], "short"),
        (lambda b: b"\0\0" + b[2:], "magic"),
        (lambda b: b[:3] + bytes((FLAG_NAK | FLAG_RETRANSMIT,)) + b[4:], "flags"),
        (lambda b: b[:-1], "length"),
        (lambda b: b[:42] + b"\0\x02" + b[44:], "count"),
    ],
)
def test_malformed_naks_raise_wire_error_only(mutate: object, reason: str) -> None:
    nak = encode_nak(stream_id=1, session=1, ranges=[NakRange(5, 3)], send_time_ns=1)
    with pytest.raises(WireError) as exc:
        decode_nak(mutate(nak))  # type: ignore[operator]
    assert exc.value.reason == reason


def test_a_nak_is_malformed_on_the_data_path() -> None:
    """Relays, receivers and the eBPF programs take KNOWN_FLAGS only: a NAK sent to a data port
    is dropped there as `flags`, never forwarded or delivered."""
    nak = encode_nak(stream_id=1, session=1, ranges=[NakRange(5, 3)], send_time_ns=1, key=KEY)
    for parse in (peek, decode):
        with pytest.raises(WireError) as exc:
            parse(nak)
        assert exc.value.reason == "flags"
    core = ReceiverCore(endpoints=1)
    core.set_stream(1, keys={1: KEY.key})
    core.datagram_received(0, nak, 0, 0, 0)
    assert core.counters(0)["malformed_flags"] == 1


def test_nak_range_bounds() -> None:
    with pytest.raises(ValueError):
        encode_nak(stream_id=1, session=1, ranges=[], send_time_ns=0)
    with pytest.raises(ValueError):
        encode_nak(stream_id=1, session=1, ranges=[NakRange(1, MAX_NAK_COUNT + 1)], send_time_ns=0)


# --- the NAK schedule ---------------------------------------------------------------------


def first_due(first: int, attempt: int, at: int, delay: int) -> int:
    return at + delay + jitter_ns(CFG.seed, 0, 1, first, attempt, CFG.nak_jitter_ns)


def test_a_hole_is_naked_after_delay_and_jitter_then_retried_then_given_up() -> None:
    t = NakTracker(CFG, endpoints=1)
    t.data(0, 1, 1, 1, 1, 0)
    t.data(0, 1, 1, 4, 1, 10)  # 2 and 3 missing
    due = first_due(2, 0, 10, CFG.nak_delay_ns)
    assert t.next_due() == due
    assert t.poll(due - 1) == []
    [req] = t.poll(due)
    assert (req.endpoint, req.stream_id, req.session, req.ranges) == (0, 1, 1, (NakRange(2, 2),))
    for attempt in (2, 3):
        due = first_due(2, attempt - 1, due, CFG.retry_ns)
        assert t.next_due() == due
        [req] = t.poll(due)
        assert req.ranges == (NakRange(2, 2, attempt),)
    due = first_due(2, 3, due, CFG.retry_ns)
    assert t.poll(due) == []  # attempts spent: given up
    assert t.next_due() is None
    assert t.counts(0) == (3, 0, 2)


def test_a_copy_that_comes_fills_the_hole_and_no_nak_goes() -> None:
    t = NakTracker(CFG, endpoints=1)
    t.data(0, 1, 1, 1, 1, 0)
    t.data(0, 1, 1, 5, 1, 0)  # 2..4 missing
    assert t.data(0, 1, 1, 3, 1, 5) == 1  # reordered, not lost
    assert t.missing(0, 1) == [(2, 1), (4, 1)]
    t.data(0, 1, 1, 2, 1, 6)
    t.data(0, 1, 1, 4, 1, 7)
    assert t.next_due() is None and t.poll(10**9) == []
    assert t.counts(0) == (0, 0, 0)


def test_holes_of_one_stream_due_together_ride_in_one_nak() -> None:
    cfg = RecoveryConfig(nak_delay_ns=100, nak_jitter_ns=1000, retry_ns=10_000, seed=1)
    t = NakTracker(cfg, endpoints=1)
    t.data(0, 1, 1, 1, 1, 0)
    t.data(0, 1, 1, 3, 1, 0)
    t.data(0, 1, 1, 5, 1, 0)
    t.data(0, 1, 1, 7, 1, 0)
    reqs = t.poll(t.next_due() or 0)
    assert len(reqs) == 1
    assert reqs[0].ranges == (NakRange(2, 1), NakRange(4, 1), NakRange(6, 1))
    assert t.counts(0) == (1, 2, 0)


def test_heartbeat_reveals_a_lost_tail_and_wide_holes_are_given_up_at_once() -> None:
    t = NakTracker(CFG, endpoints=2)
    t.heartbeat(0, 1, 1, 9, 0)  # no baseline yet: nothing
    assert t.next_due() is None
    t.data(0, 1, 1, 1, 1, 0)
    t.heartbeat(0, 1, 1, 3, 0)
    assert t.missing(0, 1) == [(2, 2)]
    t.data(1, 1, 1, 1, 1, 0)
    t.data(1, 1, 1, 3 + MAX_NAK_COUNT, 1, 0)  # one wider than a NAK may ask for
    assert t.missing(1, 1) == [] and t.counts(1) == (0, 0, MAX_NAK_COUNT + 1)
    t.data(0, 1, 2, 1, 1, 0)  # a new session: the old one's hole cannot be asked for
    assert t.missing(0, 1) == [] and t.counts(0) == (0, 0, 2)


def test_the_gap_table_is_bounded() -> None:
    t = NakTracker(RecoveryConfig(max_gaps=2), endpoints=1)
    for seq in (1, 3, 5, 7):
        t.data(0, 1, 1, seq, 1, 0)
    assert t.open_gaps == 2 and t.counts(0) == (0, 0, 1)


def test_a_split_never_takes_the_gap_table_past_its_bound() -> None:
    """A copy inside a range splits it in two; at max_gaps the part after the copy is given up
    (the bound counts every range open, not only those before the split one)."""
    t = NakTracker(RecoveryConfig(max_gaps=2), endpoints=1)
    t.data(0, 1, 1, 1, 1, 0)
    t.data(0, 1, 1, 10, 1, 0)  # 2..9 missing: the first range in the table
    t.data(0, 1, 1, 12, 1, 0)  # 11: the second
    assert t.data(0, 1, 1, 5, 1, 0) == 1  # splits 2..9
    assert t.missing(0, 1) == [(2, 3), (11, 1)]
    assert t.open_gaps == 2 and t.counts(0) == (0, 0, 4)  # 6..9 given up


def test_a_retransmission_of_a_given_up_range_counts_recovered_not_unrecoverable() -> None:
    """Its four NAKs spent, a range is given up; a retransmission answering one of them that
    comes later still is counted once, as recovered (here in time: the hold is long)."""
    w = Wired()
    w.publish(1)
    w.now = 100
    w.publish(2, lost=True)
    w.now = 200
    w.publish(3)
    # Every answer takes 5 us: the range is given up (3 NAKs, 1 us apart) before the first.
    naks = w.step(20_000, delay=5_000)
    assert len(naks) == CFG.attempts
    out = w.core.releases()
    assert [(r.seq, r.kind, r.flags) for r in out] == [
        (1, ReleaseKind.ON_TIME, 0),
        (2, ReleaseKind.ON_TIME, MP_FLAG_RECOVERED),
        (3, ReleaseKind.ON_TIME, 0),
    ]
    c = w.core.recovery_counters(0)
    assert (c["naks_sent"], c["recovered"], c["recovered_late"], c["unrecoverable"]) == (
        CFG.attempts, 1, 0, 0,
    )  # fmt: skip


# --- the retransmit buffer ------------------------------------------------------------------


def nak_of(*ranges: tuple[int, int]) -> object:
    return decode_nak(
        encode_nak(
            stream_id=1, session=1, ranges=[NakRange(f, c) for f, c in ranges], send_time_ns=0
        )
    )


def test_buffer_serves_flagged_resigned_copies_and_coalesces_per_destination() -> None:
    buf = RetransmitBuffer(capacity=4, coalesce_ns=100)
    for seq in (1, 2, 4, 7):  # 4 carries 3 messages: 4..6
        buf.add(1, seq, 3 if seq == 4 else 1, data(seq, msgs=3 if seq == 4 else 1))
    a, b = ("127.0.0.1", 1), ("127.0.0.1", 2)
    out = buf.serve(nak_of((2, 5)), a, 0, KEY)  # type: ignore[arg-type]
    assert [decode(d).header.seq for d in out] == [2, 4]
    for d in out:
        assert d[offsets()["flags"]] == FLAG_RETRANSMIT
        assert mac_matches(d, {1: KEY.key}) is None
    assert buf.serve(nak_of((5, 1)), a, 50, KEY) == []  # type: ignore[arg-type]
    assert len(buf.serve(nak_of((5, 1)), b, 50, KEY)) == 1  # type: ignore[arg-type]
    assert len(buf.serve(nak_of((5, 1)), a, 150, KEY)) == 1  # type: ignore[arg-type]
    buf.add(1, 8, 1, data(8))  # evicts 1
    assert buf.serve(nak_of((1, 1), (3, 1), (9, 2)), a, 1000, KEY) == []  # type: ignore[arg-type]
    assert buf.counts == {
        "naks_received": 5,
        "ranges_requested": 7,
        "retransmits_sent": 4,
        "retransmits_coalesced": 1,
        "retransmits_missing": 5,  # 3 (in no datagram), then 1, 3, 9, 10
        "retransmits_capped": 0,
    }


# --- a receiver core and a publisher's buffer, wired in memory -------------------------------


class Wired:
    """One receiver core with recovery and one retransmit buffer; the test decides which
    copies the tree loses."""

    def __init__(self, *, capacity: int = 64) -> None:
        self.core = ReceiverCore(endpoints=1, recovery=CFG)
        self.core.set_stream(1, keys={1: KEY.key})
        self.buf = RetransmitBuffer(capacity=capacity, coalesce_ns=0)
        self.now = 0

    def publish(self, seq: int, *, lost: bool = False) -> None:
        d = data(seq, send=self.now)
        self.buf.add(1, seq, 1, d)
        if not lost:
            self.core.datagram_received(0, d, 1, self.now, self.now)

    def step(self, to: int, *, answer: bool = True, delay: int = 0) -> list[bytes]:
        """Advance to `to`, answer every NAK (retransmissions arrive `delay` later)."""
        sent: list[bytes] = []
        while True:
            timer = self.core.get_timer()
            if timer is None or timer > to:
                break
            self.now = max(self.now, timer)
            self.core.timer(self.now)
            for nak in self.core.naks():
                sent.append(nak.data)
                assert mac_matches(nak.data, {1: KEY.key}) is None
                if answer:
                    for d in self.buf.serve(decode_nak(nak.data), ("h", 1), self.now, KEY):
                        self.core.datagram_received(0, d, 99, self.now + delay, self.now)
        self.now = to
        self.core.timer(to)
        return sent


def test_recovered_before_the_deadline_is_released_on_time_unflagged_by_gap() -> None:
    w = Wired()
    w.publish(1)
    w.now = 100
    w.publish(2, lost=True)
    w.now = 200
    w.publish(3)  # the hole is seen here
    naks = w.step(50_000)
    assert len(naks) == 1
    out = w.core.releases()
    assert [(r.seq, r.kind, r.deadline_ns, r.release_ns) for r in out] == [
        (1, ReleaseKind.ON_TIME, HOLD, HOLD),
        (2, ReleaseKind.ON_TIME, 100 + HOLD, 100 + HOLD),  # its own deadline, not clamped
        (3, ReleaseKind.ON_TIME, 200 + HOLD, 200 + HOLD),
    ]
    assert [r.flags for r in out] == [0, MP_FLAG_RECOVERED, 0]
    assert out[1].parent == 99
    assert w.core.recovery_counters(0) == {
        "naks_sent": 1,
        "naks_coalesced": 0,
        "recovered": 1,
        "recovered_late": 0,
        "unrecoverable": 0,
    }


def test_recovered_after_the_deadline_is_released_at_once_late_and_recovered() -> None:
    w = Wired()
    w.publish(1)
    w.now = 100
    w.publish(2, lost=True)
    w.now = 100 + HOLD - 50
    w.publish(3)  # the hole is seen 50 ns before 2's deadline: its NAK goes after it
    w.step(50_000)
    out = w.core.releases()
    assert [(r.seq, r.kind, r.flags) for r in out] == [
        (1, ReleaseKind.ON_TIME, 0),
        (2, ReleaseKind.LATE, MP_FLAG_LATE | MP_FLAG_RECOVERED),  # before 3: no gap flag
        (3, ReleaseKind.ON_TIME, 0),
    ]
    c = w.core.recovery_counters(0)
    assert (c["recovered"], c["recovered_late"], c["unrecoverable"]) == (0, 1, 0)


def test_beyond_recovery_is_a_gap_to_the_mp_and_counted() -> None:
    w = Wired(capacity=1)  # the buffer keeps the last datagram only
    w.publish(1)
    w.now = 100
    w.publish(2, lost=True)
    w.now = 200
    w.publish(3)
    naks = w.step(100_000)
    assert len(naks) == CFG.attempts
    out = w.core.releases()
    assert [(r.seq, r.flags) for r in out] == [(1, 0), (3, MP_FLAG_GAP_BEFORE)]
    c = w.core.recovery_counters(0)
    assert (c["naks_sent"], c["recovered"], c["unrecoverable"]) == (3, 0, 1)
    assert w.buf.counts["retransmits_missing"] == 3
    assert w.core.get_timer() is None


def test_without_recovery_the_core_sends_nothing_and_counts_zeros() -> None:
    core = ReceiverCore(endpoints=1)
    core.set_stream(1, keys={1: KEY.key})
    core.datagram_received(0, data(1), 0, 0, 0)
    core.datagram_received(0, data(3), 0, 0, 0)
    core.timer(10**9)
    assert core.naks() == []
    assert set(core.recovery_counters(0).values()) == {0}
