"""The hot-path parser agrees with jasper.wire.decode on every input, batches included."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.wire import Header, WireError, decode, decode_header, encode, encode_batch
from overlay.fastwire import peek

VALID = encode(
    Header(stream_id=7, session=3, seq=99, send_time_ns=10, deadline_ns=20, plan_epoch=2),
    b"payload",
)
BATCH = encode_batch(
    Header(stream_id=7, session=3, seq=99, send_time_ns=10, deadline_ns=20, plan_epoch=2),
    [b"one", b"", b"three", b"4"],
)


def verdict(parse, data: bytes) -> object:  # type: ignore[no-untyped-def]
    try:
        parse(data)
    except WireError as exc:
        return exc.reason
    return "ok"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_same_verdict(data: bytes) -> None:
    assert verdict(peek, data) == verdict(decode, data)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([VALID, BATCH]),
    st.integers(0, len(BATCH) - 1),
    st.integers(0, 255),
    st.integers(0, len(BATCH)),
)
def test_mutated_and_truncated_same_verdict(valid: bytes, at: int, byte: int, cut: int) -> None:
    data = bytearray(valid)
    data[at % len(valid)] = byte
    for d in (bytes(data), valid[:cut]):
        assert verdict(peek, d) == verdict(decode, d)


def test_fields_of_a_valid_datagram() -> None:
    h = decode_header(VALID)
    assert peek(VALID) == (
        h.flags,
        h.stream_id,
        h.session,
        h.plan_epoch,
        h.seq,
        h.send_time_ns,
        h.deadline_ns,
        h.msg_count,
    )
    assert peek(BATCH)[-1] == 4
