"""The hot-path header parser agrees with jasper.wire.decode_header on every input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.wire import Header, WireError, decode_header, encode
from overlay.fastwire import peek

VALID = encode(
    Header(stream_id=7, session=3, seq=99, send_time_ns=10, deadline_ns=20, plan_epoch=2),
    b"payload",
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
    assert verdict(peek, data) == verdict(decode_header, data)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.integers(0, 255), st.integers(0, len(VALID)))
def test_mutated_and_truncated_same_verdict(at: int, byte: int, cut: int) -> None:
    data = bytearray(VALID)
    data[at] = byte
    for d in (bytes(data), VALID[:cut]):
        assert verdict(peek, d) == verdict(decode_header, d)


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
    )
