"""The native receiver core against the Python reference: the same inputs, the same outputs.

This file is the definition of "the same" (docs/receiver-core.md): hypothesis drives both cores
with random sequences of copies (valid batches, duplicates, future arrivals, malformed
mutations, heartbeats; signed with the right key, the wrong key or an unknown epoch, unsigned,
tampered with after signing; far-ahead runs), timer calls, flushes, plan changes and stream
changes (keyed, unkeyed, announced sessions, key rotation, dropped streams), with loss recovery
off or on (NAK schedules whose delays, retries and bounds bind within a run), and requires equal
releases, NAK datagrams (signed bytes included), counters (recovery counters included), parents,
timers, open ranges and sizes after every step. The parsers are held to the same
verdicts (and error text) on arbitrary bytes and on mutated valid datagrams. Releases carry the
MP flags (late, gap-before in release order), and every release frames to the same MP delivery
bytes in C (jc_frame) as in jasper.mp_spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from jasper import _native, mp_spec
from jasper.receiver_core import CoreNak, CoreRelease, ReceiverCore
from jasper.recovery import RecoveryConfig
from jasper.wire import Header, StreamKey, WireError, encode_batch, sign, unpack_blocks
from jasper.wire_spec import (
    FLAG_HEARTBEAT,
    FLAG_HEDGE_COPY,
    FLAG_RETRANSMIT,
    HEADER_LEN,
    MAC_OFFSET,
    MAX_DATAGRAM,
    MAX_MESSAGE,
    offsets,
)
from overlay.fastwire import peek

U64_MAX = 2**64 - 1
FLAGS_AT = offsets()["flags"]

KEYS = {1: bytes(range(32)), 2: bytes(range(50, 82)), 3: bytes(range(200, 232))}
"""The key of each epoch the streams may hold; a copy signed with another epoch's key under
this epoch's number is a forgery with a wrong key."""

Rule = tuple[tuple[int, ...] | None, int | None] | None
"""What set_stream gets for one stream: (key epochs held or None for unkeyed, announced session
or None); None: the stream is not set (or dropped)."""

rules: st.SearchStrategy[Rule] = st.one_of(
    st.none(),
    st.tuples(
        st.one_of(
            st.none(), st.lists(st.sampled_from([1, 2, 3]), max_size=3, unique=True).map(tuple)
        ),
        st.one_of(st.none(), st.sampled_from([0, 1, 2, 3])),
    ),
)


@dataclass(frozen=True)
class Template:
    """A datagram every copy of which is byte-identical (so duplicates are real duplicates)."""

    stream: int
    session: int
    seq: int
    deadline: int | None
    """Relative to the start of the run (None: unstamped, 0 in the header)."""
    flags: int
    msgs: tuple[bytes, ...]
    signer: tuple[int, int] | None = None
    """(key epoch written, epoch whose key signs): equal for a good MAC; None: unsigned."""

    def encode(self, start: int = 0) -> bytes:
        deadline = 0 if self.deadline is None else min(U64_MAX, max(1, start + self.deadline))
        header = Header(
            stream_id=self.stream,
            session=self.session,
            seq=self.seq,
            send_time_ns=(self.seq * 3 + 1) & U64_MAX,
            deadline_ns=deadline,
            plan_epoch=self.stream,
            flags=self.flags,
        )
        data = encode_batch(header, () if self.flags & FLAG_HEARTBEAT else self.msgs)
        if self.signer is None:
            return data
        epoch, by = self.signer
        signed = bytearray(sign(data, StreamKey(by, KEYS[by])))
        # Another epoch's number on it: the MAC stays the one made with the other key.
        signed[MAC_OFFSET - 4 : MAC_OFFSET] = epoch.to_bytes(4, "big")
        return bytes(signed)


signers = st.one_of(
    st.none(),
    st.sampled_from([1, 2, 3]).map(lambda e: (e, e)),
    st.sampled_from([1, 2, 3]).map(lambda e: (e, e)),
    st.tuples(st.sampled_from([1, 2, 3, 4]), st.sampled_from([1, 2, 3])),
)

templates = st.builds(
    Template,
    stream=st.integers(1, 5),
    session=st.sampled_from([0, 1, 1, 1, 2, 3]),
    seq=st.one_of(
        st.integers(0, 12),
        st.integers(13, 200),
        st.integers(10**6, 10**6 + 4),
        st.just(U64_MAX - 3),
    ),
    deadline=st.one_of(st.none(), st.integers(-50, 800), st.integers(800, 10**6), st.just(U64_MAX)),
    flags=st.sampled_from([0, 0, 0, FLAG_HEDGE_COPY, FLAG_RETRANSMIT, FLAG_HEARTBEAT]),
    msgs=st.lists(st.binary(max_size=6), min_size=1, max_size=4).map(tuple),
    signer=signers,
)

mutations = st.one_of(
    st.none(),
    st.none(),
    st.none(),
    st.none(),
    st.tuples(st.just("hedge"), st.just(0), st.just(0)),  # a relay's hedge bit: MAC unchanged
    st.tuples(st.just("flip"), st.integers(4, 39), st.integers(0, 7)),  # a header field bit
    st.tuples(st.just("flip"), st.integers(HEADER_LEN, HEADER_LEN + 30), st.integers(0, 7)),
    st.tuples(st.just("flip"), st.integers(MAC_OFFSET, HEADER_LEN - 1), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 80), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 80), st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 4), st.integers(0, 255)),
    st.tuples(st.just("oversize"), st.integers(1, 40), st.integers(0, 255)),
    st.tuples(st.just("random"), st.integers(0, 100), st.integers(0, 2**31)),
)


def mutate(data: bytes, mutation: tuple[str, int, int] | None) -> bytes:
    if mutation is None:
        return data
    kind, a, b = mutation
    if kind == "hedge":
        out = bytearray(data)
        out[FLAGS_AT] |= FLAG_HEDGE_COPY
        return bytes(out)
    if kind == "flip":  # tampered after signing: still well formed when it hits a field
        out = bytearray(data)
        out[a % len(out)] ^= 1 << b
        return bytes(out)
    if kind == "set":
        out = bytearray(data)
        out[a % len(out)] = b
        return bytes(out)
    if kind == "cut":
        return data[: a % len(data)]
    if kind == "append":
        return data + bytes([b]) * a
    if kind == "oversize":
        return data + bytes([b]) * (MAX_DATAGRAM - len(data) + a)
    return (b.to_bytes(4, "big") * (a // 4 + 1))[:a]


copy_ops = st.tuples(
    st.just("copy"),
    st.integers(0, 63),  # template index (mod the pool)
    st.integers(0, 7),  # endpoint (mod endpoints)
    st.sampled_from([0, 1, 2, 3, 70, 2**32 - 1]),  # parent
    st.one_of(st.integers(-30, 0), st.integers(0, 80)),  # arrival - now
    st.sampled_from(["bytes", "bytearray", "memoryview"]),
    mutations,
)
ops = st.tuples(
    st.sampled_from([0, 0, 1, 2, 5, 10, 20, 50]),  # time step before the op
    st.booleans(),  # pull and compare releases after the op
    st.one_of(
        copy_ops,
        copy_ops,
        copy_ops,
        copy_ops,
        st.tuples(st.just("timer")),
        st.tuples(st.just("flush")),
        st.tuples(st.just("grow"), st.integers(0, 2)),
        st.tuples(st.just("stream"), st.integers(1, 5), rules),
        st.tuples(
            st.just("run"),  # consecutive seqs from far ahead: the resync after AHEAD_RESYNC
            st.integers(1, 5),
            st.integers(0, 7),
            st.sampled_from([30, 10**6, 2**40]),
            st.integers(60, 70),
            st.sampled_from([None, 1, 2]),
        ),
    ),
)
recoveries = st.one_of(
    st.none(),
    st.builds(
        RecoveryConfig,
        # Times of the order of the steps' (0..50 ns a step), so NAKs fall due, are retried
        # and given up within a run.
        nak_delay_ns=st.sampled_from([0, 5, 40]),
        nak_jitter_ns=st.sampled_from([0, 3, 30]),
        retry_ns=st.sampled_from([0, 10, 60, 300]),
        attempts=st.sampled_from([1, 2, 4]),
        max_gaps=st.sampled_from([1, 2, 3, 1024]),
        seed=st.integers(0, 2**64 - 1),
    ),
)
configs = st.fixed_dictionaries(
    {
        "endpoints": st.integers(1, 4),
        "ring_size": st.sampled_from([2, 4, 8, 16, 4096]),
        "hold_capacity": st.one_of(st.integers(1, 8), st.just(65536)),
        "pending_capacity": st.one_of(st.integers(0, 8), st.just(65536)),
        "ahead_window": st.sampled_from([1, 3, 16, 100, 1 << 20, 2**70]),
        "recovery": recoveries,
    }
)


def set_rule(core: Any, stream: int, rule: Rule) -> None:
    if rule is None:
        core.drop_stream(stream)
        return
    epochs, session = rule
    keys = None if epochs is None else {e: KEYS[e] for e in epochs}
    core.set_stream(stream, keys=keys, session=session)


def state(core: Any) -> tuple[object, ...]:
    endpoints = core.endpoints
    return (
        endpoints,
        [core.counters(e) for e in range(endpoints)],
        [core.recovery_counters(e) for e in range(endpoints)],
        [core.parents(e) for e in range(endpoints)],
        core.get_timer(),
        core.held,
        core.pending,
        core.clamped,
        core.open_gaps,
    )


def as_kind(data: bytes, kind: str) -> bytes | bytearray | memoryview:
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(bytearray(data))
    return data


@settings(max_examples=400, deadline=None)
@given(
    configs,
    st.lists(rules, min_size=5, max_size=5),
    st.lists(templates, min_size=2, max_size=16),
    st.integers(0, 10**12),
    st.lists(ops, min_size=20, max_size=120),
)
def test_native_core_equals_reference(
    config: dict[str, int], streams: list[Rule], pool: list[Template], start: int, steps: list[Any]
) -> None:
    ref = ReceiverCore(**config)
    nat = _native.ReceiverCore(**config)
    for stream, rule in enumerate(streams, 1):
        set_rule(ref, stream, rule)
        set_rule(nat, stream, rule)
    datagrams = [t.encode(start) for t in pool]
    now = start
    for i, (dt, pull, op) in enumerate(steps):
        now += dt
        if op[0] == "copy":
            _, which, endpoint, parent, ahead, kind, mutation = op
            data = mutate(datagrams[which % len(datagrams)], mutation)
            endpoint %= ref.endpoints
            arrival = max(0, now + ahead)
            for core in (ref, nat):
                core.datagram_received(endpoint, as_kind(data, kind), parent, arrival, now)
        elif op[0] == "timer":
            ref.timer(now)
            nat.timer(now)
        elif op[0] == "flush":
            ref.flush(now)
            nat.flush(now)
        elif op[0] == "stream":  # a new plan: keys rotate, a session is announced, a drop
            set_rule(ref, op[1], op[2])
            set_rule(nat, op[1], op[2])
        elif op[0] == "run":
            _, stream, endpoint, base, count, epoch = op
            endpoint %= ref.endpoints
            for seq in range(base, base + count):
                t = Template(
                    stream, 1, seq, None, 0, (b"r",), None if epoch is None else (epoch, epoch)
                )
                data = t.encode(start)
                ref.datagram_received(endpoint, data, 1, now, now)
                nat.datagram_received(endpoint, data, 1, now, now)
        else:
            n = ref.endpoints + op[1]
            ref.set_endpoints(n)
            nat.set_endpoints(n)
        if pull:
            got = nat.releases()
            assert got == ref.releases(), f"step {i}: {op}"
            assert_same_framing(got)
            assert nat.naks() == ref.naks(), f"step {i}: {op}"
        assert state(nat) == state(ref), f"step {i}: {op}"
    now += 1
    ref.flush(now)
    nat.flush(now)
    got, want = nat.releases(), ref.releases()
    assert got == want
    assert [type(r) for r in got] == [type(r) for r in want]
    assert state(nat) == state(ref)
    assert_same_framing(got)
    naks = nat.naks()
    assert naks == ref.naks()
    assert [type(n) for n in naks] == [CoreNak] * len(naks)


def mp_frame_of(r: CoreRelease) -> bytes:
    return mp_spec.frame(
        r.payload, stream_id=r.stream_id, session=r.session, seq=r.seq, count=r.count,
        flags=r.flags, release_ns=r.release_ns, deadline_ns=r.deadline_ns,
    )  # fmt: skip


def assert_same_framing(releases: list[CoreRelease]) -> None:
    """What an MP receives for each release (equal flags came with the releases): the native
    jc_frame writes the bytes jasper.mp_spec.frame does, and they parse back to the release."""
    for r in releases:
        framed = _native.frame(r)
        assert framed == mp_frame_of(r)
        msgs = mp_spec.parse(framed)
        assert [m.seq for m in msgs] == list(range(r.seq, r.seq + r.count))
        assert [m.payload for m in msgs] == unpack_blocks(r.payload)
        assert {(m.stream_id, m.session, m.release_ns, m.deadline_ns) for m in msgs} <= {
            (r.stream_id, r.session, r.release_ns, r.deadline_ns)
        }
        assert [m.flags for m in msgs] == [r.flags] + [r.flags & ~mp_spec.MP_FLAG_GAP_BEFORE] * (
            r.count - 1
        )


def verdict(parse: Any, data: bytes) -> object:
    try:
        return parse(data)
    except WireError as exc:
        return ("error", exc.reason, str(exc))


VALID = (
    Template(7, 3, 99, 20, 0, (b"payload",)).encode(),
    Template(7, 3, 99, 20, FLAG_HEDGE_COPY, (b"one", b"", b"three", b"4")).encode(),
    Template(7, 3, 99, 20, FLAG_HEARTBEAT, ()).encode(),
    Template(1, 1, 1, None, 0, (b"x" * MAX_MESSAGE,)).encode(),
)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=160))
def test_peek_random_bytes(data: bytes) -> None:
    assert verdict(_native.peek, data) == verdict(peek, data)


@settings(max_examples=1000, deadline=None)
@given(st.binary(min_size=HEADER_LEN, max_size=HEADER_LEN + 40))
def test_peek_random_bytes_behind_a_good_magic(data: bytes) -> None:
    data = VALID[0][:4] + data[4:]
    assert verdict(_native.peek, data) == verdict(peek, data)


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
    st.one_of(st.none(), st.integers(0, 2000)),
    st.binary(max_size=8),
)
def test_peek_mutated_valid_datagrams(
    valid: bytes, sets: list[tuple[int, int]], cut: int | None, tail: bytes
) -> None:
    data = bytearray(valid)
    for at, byte in sets:
        data[at % len(data)] = byte
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    data += tail
    for d in (bytes(data), bytearray(data), memoryview(bytes(data))):
        assert verdict(_native.peek, d) == verdict(peek, bytes(d))
