"""jasper._native.ReceiverCore against docs/receiver-core.md: the reference's own hand-clocked
tests run against the native twin, then what only the binding can get wrong (arguments, buffer
types, reference counts, memory, the 64-parent bound) and peek's verdicts."""

from __future__ import annotations

import inspect
import resource
import sys
from collections.abc import Callable

import pytest

import tests.test_receiver_core as reference_tests
import tests.test_recovery as recovery_tests
from jasper import _native
from jasper.receiver_core import COUNTER_NAMES, CoreNak, CoreRelease, ReleaseKind
from jasper.recovery import RecoveryConfig
from jasper.wire import Header, WireError, encode_batch
from jasper.wire_spec import FLAG_HEARTBEAT, MALFORMED_REASONS, MAX_DATAGRAM, REJECT_REASONS
from overlay.fastwire import peek

U64_MAX = 2**64 - 1


def native(**config: int) -> _native.ReceiverCore:
    """A native core taking streams 1..3 unauthenticated, as tests.test_receiver_core.make."""
    core = _native.ReceiverCore(**config)
    for stream in reference_tests.OPEN_STREAMS:
        core.set_stream(stream, keys=None)
    return core


def dgram(
    seq: int,
    *,
    deadline: int = 0,
    stream: int = 1,
    msgs: tuple[bytes, ...] = (b"m",),
    session: int = 1,
) -> bytes:
    header = Header(
        stream_id=stream, session=session, seq=seq, send_time_ns=5, deadline_ns=deadline
    )
    return encode_batch(header, msgs)


REFERENCE_TESTS = sorted(
    name for name, fn in vars(reference_tests).items() if name.startswith("test_") and callable(fn)
)


@pytest.mark.parametrize("name", REFERENCE_TESTS)
def test_reference_tests_pass_on_the_native_core(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test of the Python core, with the native core in its place."""
    monkeypatch.setattr(reference_tests, "ReceiverCore", _native.ReceiverCore)
    test: Callable[[], None] = getattr(reference_tests, name)
    if not hasattr(test, "hypothesis"):
        assert not inspect.signature(test).parameters, f"{name} takes fixtures"
    test()


def test_reference_tests_were_found() -> None:
    assert len(REFERENCE_TESTS) >= 10


RECOVERY_TESTS = sorted(
    name
    for name, fn in vars(recovery_tests).items()
    if name.startswith("test_")
    and callable(fn)
    and any(w in inspect.getsource(fn) for w in ("ReceiverCore(", "Wired("))
)


@pytest.mark.parametrize("name", RECOVERY_TESTS)
def test_recovery_tests_pass_on_the_native_core(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every loss-recovery test that drives a receiver core (its NAK schedule wired to a
    publisher's buffer in memory), with the native core in its place."""
    monkeypatch.setattr(recovery_tests, "ReceiverCore", _native.ReceiverCore)
    test: Callable[[], None] = getattr(recovery_tests, name)
    assert not inspect.signature(test).parameters, f"{name} takes fixtures"
    test()
    assert isinstance(recovery_tests.Wired().core, _native.ReceiverCore)


def test_recovery_tests_were_found() -> None:
    assert len(RECOVERY_TESTS) >= 5


def test_recovery_arguments_and_naks_keep_no_references() -> None:
    """The recovery config is read once (a field the native core cannot take is a ValueError);
    NAKs come out as CoreNak, and pulling them leaks nothing."""
    for bad in (
        RecoveryConfig(nak_delay_ns=2**63),
        RecoveryConfig(retry_ns=2**62, nak_jitter_ns=1),
    ):
        with pytest.raises(ValueError):
            _native.ReceiverCore(endpoints=1, recovery=bad)
    with pytest.raises(AttributeError):
        _native.ReceiverCore(endpoints=1, recovery=object())  # type: ignore[arg-type]
    config = RecoveryConfig(nak_delay_ns=0, nak_jitter_ns=0, retry_ns=10**9)
    core = _native.ReceiverCore(endpoints=2, recovery=config)
    assert core.open_gaps == 0 and core.naks() == []
    core.set_stream(1, keys=None)
    before = rss_kib()
    now = 0
    for round_ in range(2000):
        for seq in (1, 3):  # seq 2 is missing on both endpoints, every session
            for endpoint in (0, 1):
                core.datagram_received(endpoint, dgram(seq, session=round_ + 1), 0, now, now)
        naks = core.naks()  # due at once; a new session gives the last one's ranges up
        now += 10**7
        core.timer(now)
        core.releases()
        assert [type(n) for n in naks] == [CoreNak, CoreNak]
        assert [(n.endpoint, n.session) for n in naks] == [(0, round_ + 1), (1, round_ + 1)]
    assert rss_kib() - before < 2048
    assert core.recovery_counters(0)["naks_sent"] == 2000
    assert core.recovery_counters(0)["unrecoverable"] == 1999


def test_counter_names_and_reasons_match_the_reference() -> None:
    core = _native.ReceiverCore(endpoints=1)
    assert tuple(core.counters(0)) == COUNTER_NAMES
    malformed = COUNTER_NAMES[11 : 11 + len(MALFORMED_REASONS)]
    rejected = COUNTER_NAMES[11 + len(MALFORMED_REASONS) :]
    assert [n[len("malformed_") :] for n in malformed] == list(MALFORMED_REASONS)
    assert [n[len("rejected_") :] for n in rejected] == list(REJECT_REASONS)


def test_constructor_arguments() -> None:
    with pytest.raises(TypeError):
        _native.ReceiverCore()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _native.ReceiverCore(2)  # type: ignore[misc]
    with pytest.raises(TypeError):
        _native.ReceiverCore(endpoints=1, ringsize=8)  # type: ignore[call-arg]
    for bad in (
        {"endpoints": 0},
        {"endpoints": -1},
        {"endpoints": 2**40},
        {"endpoints": 1, "ring_size": 0},
        {"endpoints": 1, "ring_size": 1},
        {"endpoints": 1, "ring_size": 12},
        {"endpoints": 1, "hold_capacity": 0},
        {"endpoints": 1, "hold_capacity": 2**33},
        {"endpoints": 1, "pending_capacity": -1},
    ):
        with pytest.raises(ValueError):
            _native.ReceiverCore(**bad)
    core = _native.ReceiverCore(endpoints=3, ring_size=2, hold_capacity=1, pending_capacity=0)
    assert (core.endpoints, core.held, core.pending, core.clamped) == (3, 0, 0, 0)


def test_call_arguments() -> None:
    core = native(endpoints=2)
    d = dgram(1)
    for endpoint in (-1, 2, 2**70):
        with pytest.raises(ValueError):
            core.datagram_received(endpoint, d, 0, 10, 10)
    for parent in (-1, 2**32):
        with pytest.raises(ValueError):
            core.datagram_received(0, d, parent, 10, 10)
    with pytest.raises(TypeError):
        core.datagram_received(0, "text", 0, 10, 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        core.datagram_received(0, d, 0, 10)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        core.datagram_received(0.0, d, 0, 10, 10)  # type: ignore[arg-type]
    # Native only: times are ns since the epoch, never negative.
    with pytest.raises(ValueError):
        core.datagram_received(0, d, 0, -1, 10)
    with pytest.raises(ValueError):
        core.timer(-1)
    for method in (core.counters, core.parents):
        with pytest.raises(ValueError):
            method(2)
    with pytest.raises(ValueError):
        core.set_endpoints(1)
    # Nothing above counted anything.
    assert core.counters(0)["received"] == 0
    core.datagram_received(endpoint=1, data=d, parent=2**32 - 1, arrival_ns=10, now_ns=10)
    core.timer(now_ns=11)
    core.flush(now_ns=12)
    core.set_endpoints(endpoints=4)
    assert core.counters(endpoint=1)["accepted"] == 1
    assert core.parents(endpoint=1) == {2**32 - 1: (1, 1)}
    assert core.endpoints == 4


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_buffer_types_and_owned_payloads(kind: Callable[[bytes], object]) -> None:
    core = native(endpoints=1)
    raw = bytearray(dgram(1, deadline=500, msgs=(b"hello",)))
    data = kind(bytes(raw)) if kind is bytes else kind(raw)
    core.datagram_received(0, data, 3, 200, 100)  # waits for its arrival
    raw[-1] = ord("X")  # the caller reuses its receive buffer
    core.timer(200)
    assert (core.pending, core.held, core.get_timer()) == (0, 1, 500)
    core.timer(500)
    (r,) = core.releases()
    assert type(r) is CoreRelease
    assert r.kind is ReleaseKind.ON_TIME
    assert r.payload == b"\x00\x05hello"
    assert type(r.payload) is bytes
    assert r == (0, 3, 1, 1, 1, 1, ReleaseKind.ON_TIME, 500, 5, 200, 500, b"\x00\x05hello", 0)


def test_timer_and_deadline_at_the_top_of_u64() -> None:
    core = native(endpoints=1)
    core.datagram_received(0, dgram(1, deadline=U64_MAX), 0, 10, 10)
    assert core.get_timer() == U64_MAX
    core.timer(2**63 - 1)
    assert core.held == 1
    core.flush(2**63 - 1)
    (r,) = core.releases()
    assert (r.deadline_ns, r.release_ns, r.kind) == (U64_MAX, 2**63 - 1, ReleaseKind.ON_TIME)


def test_parents_beyond_64_are_counted_under_the_last_id() -> None:
    assert (_native.MAX_PARENTS, _native.PARENT_OTHER) == (64, 0xFFFFFFFF)
    core = native(endpoints=2)
    for parent in range(70):
        core.datagram_received(0, dgram(parent + 1), parent, 10, 10)
    core.datagram_received(0, dgram(1), 3, 10, 10)  # a duplicate from a tracked parent
    core.datagram_received(0, dgram(1), 69, 10, 10)  # a duplicate from an untracked one
    core.datagram_received(0, dgram(100), 0xFFFFFFFF, 10, 10)  # the id itself
    parents = core.parents(0)
    assert len(parents) == 65
    assert all(parents[p] == (1, 1) for p in range(64) if p != 3)
    assert parents[3] == (2, 1)
    assert parents[0xFFFFFFFF] == (6 + 1 + 1, 6 + 1)
    assert core.parents(1) == {}
    assert sum(c for c, _ in parents.values()) == core.counters(0)["received"]


def test_many_streams_and_endpoints() -> None:
    core = native(endpoints=1, ring_size=2)
    core.set_endpoints(40)
    for stream in range(2000):
        core.set_stream(stream * 7919, keys=None)
    for stream in range(2000):
        core.datagram_received(stream % 40, dgram(1, stream=stream * 7919), 0, 10, 10)
        core.datagram_received(stream % 40, dgram(1, stream=stream * 7919), 1, 10, 10)
    assert len(core.releases()) == 2000
    assert sum(core.counters(e)["duplicates"] for e in range(40)) == 2000


def test_oversize_and_heartbeats_take_no_buffer() -> None:
    core = native(endpoints=1, pending_capacity=2)
    huge = dgram(1) + bytes(MAX_DATAGRAM)
    heartbeat = encode_batch(
        Header(stream_id=1, session=1, seq=1, send_time_ns=5, deadline_ns=0, flags=FLAG_HEARTBEAT),
        (),
    )
    core.datagram_received(0, huge, 0, 100, 10)
    core.datagram_received(0, heartbeat, 0, 100, 10)
    assert core.pending == 1
    core.timer(100)
    assert {k: v for k, v in core.counters(0).items() if v} == {
        "received": 2,
        "malformed_length": 1,
        "heartbeats": 1,
    }


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def run_cycles(core: _native.ReceiverCore, data: list[bytes], rounds: int, now: int) -> int:
    for _ in range(rounds):
        for i, d in enumerate(data):
            core.datagram_received(i % 4, d, i % 3, now + 50, now)
            core.datagram_received(i % 4, d, 1, now + 20, now)
            now += 1
            core.timer(now)
            core.releases()
        core.flush(now)
        assert len(core.releases()) <= 4 * len(data)
    return now


def test_no_leaks_per_copy() -> None:
    """Reference counts of the inputs stay put, and a second run of the same work allocates
    nothing more (the pools are warm)."""
    core = native(endpoints=4, ring_size=65536)
    data = [dgram(seq, deadline=0 if seq % 5 == 0 else 10**6 + seq * 10) for seq in range(1, 3001)]
    now = run_cycles(core, data, 2, 10**6)
    refs = [sys.getrefcount(d) for d in data[:10]]
    kinds = [sys.getrefcount(k) for k in ReleaseKind]
    before = rss_kib()
    now = run_cycles(core, data[::-1], 3, now)
    assert rss_kib() - before < 2048
    assert [sys.getrefcount(d) for d in data[:10]] == refs
    assert [sys.getrefcount(k) for k in ReleaseKind] == kinds


def test_default_capacities_are_not_preallocated() -> None:
    before = rss_kib()
    cores = [_native.ReceiverCore(endpoints=20) for _ in range(50)]
    assert rss_kib() - before < 8 * 1024
    assert all(c.held == 0 for c in cores)


VALID = dgram(9, deadline=20, msgs=(b"a", b"", b"ccc"))


def test_peek_fields_and_errors() -> None:
    assert _native.peek(VALID) == peek(VALID)
    assert _native.peek(memoryview(VALID)) == peek(VALID)
    assert _native.peek(bytearray(VALID)) == peek(VALID)
    for bad, reason in (
        (b"", "short"),
        (b"XX" + VALID[2:], "magic"),
        (VALID[:-1], "length"),
        (VALID + b"\x00", "length"),
    ):
        with pytest.raises(WireError) as err:
            _native.peek(bad)
        assert err.value.reason == reason
        with pytest.raises(WireError) as want:
            peek(bad)
        assert str(err.value) == str(want.value)
    with pytest.raises(TypeError):
        _native.peek("text")  # type: ignore[arg-type]


KEY = bytes(range(32))


def test_set_stream_arguments_and_the_four_key_bound() -> None:
    core = _native.ReceiverCore(endpoints=1)
    core.set_stream(5, keys={e: KEY for e in range(1, 5)}, session=0)  # four: the bound
    with pytest.raises(ValueError):
        core.set_stream(5, keys={e: KEY for e in range(1, 6)})  # native only: five
    core.set_stream(stream_id=6, keys={1: bytearray(KEY), 2: memoryview(KEY)}, session=None)
    with pytest.raises(TypeError):
        core.set_stream(5)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        core.set_stream(5, None)  # type: ignore[misc]
    with pytest.raises(TypeError):
        core.set_stream(5, keys={1: "text" * 8})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        core.set_stream("5", keys=None)  # type: ignore[arg-type]
    for bad in (-1, 2**32, 2**70):
        with pytest.raises(ValueError):
            core.set_stream(bad, keys=None)
    for epoch in (-1, 0, 2**32):
        with pytest.raises(ValueError):
            core.set_stream(5, keys={epoch: KEY})
    # drop_stream is dict.pop(id, None): anything that names no stream is ignored.
    for other in (7, -1, 2**70, "x", None):
        core.drop_stream(other)  # type: ignore[arg-type]
    for bad_window in (0, -1, -(2**70)):
        with pytest.raises(ValueError):
            _native.ReceiverCore(endpoints=1, ahead_window=bad_window)
    with pytest.raises(TypeError):
        _native.ReceiverCore(endpoints=1, ahead_window=1.5)  # type: ignore[arg-type]
    _native.ReceiverCore(endpoints=1, ahead_window=2**70)  # wider than any seq gap


def test_set_stream_keeps_no_references_and_rotation_leaks_nothing() -> None:
    core = _native.ReceiverCore(endpoints=1)
    keys = {1: bytes(KEY), 2: bytes(range(50, 82))}
    refs = (sys.getrefcount(keys), *(sys.getrefcount(k) for k in keys.values()))
    for i in range(2000):
        core.set_stream(5, keys=keys, session=i)
        core.drop_stream(5)
    assert (sys.getrefcount(keys), *(sys.getrefcount(k) for k in keys.values())) == refs
    before = rss_kib()
    for i in range(20000):  # a keyed context per key and call: all freed on replace or drop
        core.set_stream(5 + i % 3, keys=keys, session=None)
        if i % 7 == 0:
            core.drop_stream(5 + i % 3)
    assert rss_kib() - before < 2048
