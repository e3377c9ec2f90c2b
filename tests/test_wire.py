"""Wire codec: golden bytes, round trips, fuzzing, and the Scapy layer."""

from __future__ import annotations

import hashlib
import hmac
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jasper import wire_spec
from jasper.wire import (
    Header,
    StreamKey,
    WireError,
    decode,
    decode_header,
    encode,
    encode_batch,
    mac_matches,
    mac_of,
    set_flags,
    sign,
)
from jasper.wire_spec import FLAG_HEARTBEAT, FLAG_HEDGE_COPY, HEADER_LEN, MAX_MESSAGE, MAX_PAYLOAD

GOLDEN_HEADER = Header(
    stream_id=0x01020304,
    session=0x0A0B0C0D,
    seq=0x1122334455667788,
    send_time_ns=1_700_000_000_123_456_789,
    deadline_ns=1_700_000_000_123_956_789,
    plan_epoch=7,
    flags=FLAG_HEDGE_COPY,
)
GOLDEN_KEY = StreamKey(1, bytes(range(32)))
GOLDEN_BYTES = bytes.fromhex(
    "4a53"  # magic
    "03"  # version
    "01"  # flags: hedge copy
    "01020304"  # stream
    "0a0b0c0d"  # session
    "00000007"  # plan epoch
    "1122334455667788"  # seq
    "17979cfe3d85cd15"  # send time
    "17979cfe3d8d6e35"  # deadline
    "0005"  # payload length
    "0001"  # message count
    "00000001"  # key epoch
    # HMAC-SHA256 over bytes 0..47 (flags 0x00) and the payload, first 16 bytes; the same as
    # `openssl dgst -sha256 -mac HMAC -macopt hexkey:000102...1f` of those bytes.
    "c55d91fbdbdec77e480a0d00997c472d"  # mac
    "0003"  # block: message length
    "616263"  # message "abc"
)


def test_layout_is_64_bytes_and_aligned() -> None:
    assert HEADER_LEN == 64
    offs = wire_spec.offsets()
    assert offs["seq"] == 16 and offs["send_time_ns"] == 24 and offs["deadline_ns"] == 32
    assert offs["key_epoch"] == 44 and offs["mac"] == wire_spec.MAC_OFFSET == 48
    assert MAX_PAYLOAD == 1500 - 20 - 8 - 64


def test_golden_bytes_encode() -> None:
    assert encode(GOLDEN_HEADER, b"abc", key=GOLDEN_KEY) == GOLDEN_BYTES


def test_golden_mac_is_hmac_sha256_of_the_covered_bytes() -> None:
    covered = GOLDEN_BYTES[:3] + b"\x00" + GOLDEN_BYTES[4:48] + GOLDEN_BYTES[64:]
    full = hmac.new(GOLDEN_KEY.key, covered, hashlib.sha256).digest()
    assert GOLDEN_BYTES[48:64] == full[:16] == mac_of(GOLDEN_BYTES, GOLDEN_KEY.key)
    assert mac_matches(GOLDEN_BYTES, {1: GOLDEN_KEY.key}) is None
    # The hedge bit is outside the MAC: a relay's copy keeps the tag valid.
    assert mac_matches(set_flags(GOLDEN_BYTES, 0), {1: GOLDEN_KEY.key}) is None
    assert mac_matches(set_flags(GOLDEN_BYTES, 2), {1: GOLDEN_KEY.key}) == "mac"
    assert mac_matches(GOLDEN_BYTES, {2: GOLDEN_KEY.key}) == "key"
    assert mac_matches(GOLDEN_BYTES, {1: bytes(32)}) == "mac"


@given(data=st.binary(min_size=64, max_size=200), flip=st.integers(0, 199))
def test_any_changed_covered_byte_breaks_the_mac(data: bytes, flip: int) -> None:
    signed = sign(data, GOLDEN_KEY)
    at = flip % len(signed)
    if at == 3:
        return  # the flags byte: the hedge bit is uncovered by design, tested above
    changed = bytearray(signed)
    changed[at] ^= 0x80
    expect = "key" if 44 <= at < 48 else "mac"
    assert mac_matches(bytes(changed), {1: GOLDEN_KEY.key}) == expect


def test_stream_key_validates_and_hides_its_secret() -> None:
    with pytest.raises(ValueError):
        StreamKey(0, bytes(32))
    with pytest.raises(ValueError):
        StreamKey(1, bytes(31))
    assert "000102" not in repr(GOLDEN_KEY)


def test_golden_bytes_decode() -> None:
    msg = decode(GOLDEN_BYTES)
    assert msg.payload == b"abc"
    h = msg.header
    assert (h.stream_id, h.session, h.seq, h.plan_epoch, h.flags) == (
        0x01020304,
        0x0A0B0C0D,
        0x1122334455667788,
        7,
        FLAG_HEDGE_COPY,
    )
    assert h.send_time_ns == GOLDEN_HEADER.send_time_ns
    assert h.deadline_ns == GOLDEN_HEADER.deadline_ns
    assert h.payload_len == 5 and h.msg_count == 1
    assert h.key_epoch == 1 and h.mac == GOLDEN_BYTES[48:64]


@given(
    stream_id=st.integers(0, 2**32 - 1),
    session=st.integers(0, 2**32 - 1),
    plan_epoch=st.integers(0, 2**32 - 1),
    seq=st.integers(0, 2**64 - 1),
    send=st.integers(0, 2**64 - 1),
    deadline=st.integers(0, 2**64 - 1),
    flags=st.sampled_from([0, 1, 2, 3]),
    payload=st.binary(max_size=MAX_MESSAGE),
)
def test_round_trip(
    stream_id: int,
    session: int,
    plan_epoch: int,
    seq: int,
    send: int,
    deadline: int,
    flags: int,
    payload: bytes,
) -> None:
    h = Header(
        stream_id=stream_id,
        session=session,
        seq=seq,
        send_time_ns=send,
        deadline_ns=deadline,
        plan_epoch=plan_epoch,
        flags=flags,
    )
    data = encode(h, payload)
    assert len(data) == HEADER_LEN + 2 + len(payload)
    msg = decode(data)
    assert msg.payload == payload
    assert msg.header.seq == seq and msg.header.session == session
    assert msg.header.send_time_ns == send and msg.header.deadline_ns == deadline
    assert msg.header.flags == flags and msg.header.plan_epoch == plan_epoch
    assert encode(msg.header, msg.payload) == data


def test_encode_rejects_local_misuse() -> None:
    base = dict(stream_id=1, session=1, seq=1, send_time_ns=0, deadline_ns=0)
    with pytest.raises(ValueError, match="stream_id"):
        encode(Header(**{**base, "stream_id": 2**32}))
    with pytest.raises(ValueError, match="seq"):
        encode(Header(**{**base, "seq": -1}))
    with pytest.raises(ValueError, match="flags"):
        encode(Header(**base, flags=0x80))
    with pytest.raises(ValueError, match="payload"):
        encode(Header(**base), b"x" * (MAX_MESSAGE + 1))
    with pytest.raises(ValueError, match="at least one"):
        encode_batch(Header(**base), [])
    with pytest.raises(ValueError, match="heartbeat"):
        encode_batch(Header(**base, flags=FLAG_HEARTBEAT), [b"x"])
    with pytest.raises(ValueError, match="exceeds"):
        encode_batch(Header(**base), [b"x" * 700, b"y" * 700, b"z" * 100])
    with pytest.raises(ValueError, match="last seq"):
        encode_batch(Header(**{**base, "seq": 2**64 - 1}), [b"a", b"b"])


@given(
    seq=st.integers(1, 2**40),
    messages=st.lists(st.binary(max_size=80), min_size=1, max_size=17),
)
def test_batch_round_trip(seq: int, messages: list[bytes]) -> None:
    h = Header(stream_id=3, session=4, seq=seq, send_time_ns=5, deadline_ns=6)
    data = encode_batch(h, messages)
    assert len(data) == HEADER_LEN + sum(2 + len(m) for m in messages)
    msg = decode(data)
    assert msg.messages == tuple(messages)
    assert msg.header.msg_count == len(messages) and msg.header.seq == seq
    assert encode_batch(msg.header, msg.messages) == data
    if len(messages) > 1:
        with pytest.raises(ValueError, match="batch"):
            _ = msg.payload


def test_heartbeat_carries_no_messages() -> None:
    hb = encode(Header(stream_id=1, session=1, seq=9, send_time_ns=1, deadline_ns=0,
                       flags=FLAG_HEARTBEAT))  # fmt: skip
    assert len(hb) == HEADER_LEN
    msg = decode(hb)
    assert msg.messages == () and msg.payload == b"" and msg.header.msg_count == 0


def _patched(data: bytes, at: int, raw: bytes) -> bytes:
    return data[:at] + raw + data[at + len(raw) :]


BATCH = encode_batch(
    Header(stream_id=1, session=1, seq=10, send_time_ns=1, deadline_ns=2), [b"ab", b"", b"cde"]
)
HEARTBEAT = encode(
    Header(stream_id=1, session=1, seq=9, send_time_ns=1, deadline_ns=0, flags=FLAG_HEARTBEAT)
)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "short"),
        (GOLDEN_BYTES[:63], "short"),
        (b"\x00\x00" + GOLDEN_BYTES[2:], "magic"),
        (GOLDEN_BYTES[:2] + b"\x01" + GOLDEN_BYTES[3:], "version"),
        (GOLDEN_BYTES[:2] + b"\x02" + GOLDEN_BYTES[3:], "version"),
        (GOLDEN_BYTES[:3] + b"\x80" + GOLDEN_BYTES[4:], "flags"),
        (GOLDEN_BYTES[:-1], "length"),
        (GOLDEN_BYTES + b"x", "length"),
        # The batch: a count that disagrees with the blocks, a block that overruns.
        (_patched(BATCH, 42, b"\x00\x02"), "count"),  # 3 blocks, count 2: bytes left over
        (_patched(BATCH, 42, b"\x00\x04"), "overrun"),  # count 4: the 4th block is missing
        (_patched(BATCH, 42, b"\x00\x00"), "count"),  # data with no messages
        (_patched(BATCH, 64, b"\x00\x09"), "overrun"),  # first block claims 9 bytes
        (_patched(BATCH, 64, b"\x00\x01"), "overrun"),  # blocks misaligned from the first
        (_patched(GOLDEN_BYTES, 64, b"\x00\x02"), "count"),  # one block, a byte left over
        (_patched(GOLDEN_BYTES, 64, b"\x00\x04"), "overrun"),  # one block, one byte short
        (_patched(HEARTBEAT, 42, b"\x00\x01"), "count"),  # a heartbeat with a message
    ],
)
def test_decode_errors_name_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        decode(data)
    assert info.value.reason == reason


def test_fuzz_100k_random_and_truncated_inputs_raise_only_wire_error() -> None:
    rng = random.Random(20261123)
    valid = 0
    for i in range(100_000):
        kind = i % 4
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 200))
        elif kind == 1:
            data = GOLDEN_BYTES[: rng.randrange(0, len(GOLDEN_BYTES))]
        elif kind == 2:
            buf = bytearray(GOLDEN_BYTES)
            for _ in range(rng.randrange(1, 4)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            data = bytes(buf)
        else:
            data = GOLDEN_BYTES[:HEADER_LEN] + rng.randbytes(rng.randrange(0, 40))
        try:
            decode(data)
            valid += 1
        except WireError:
            pass
    # Corrupting only the header's non-checked bytes keeps a datagram valid; most inputs are not.
    assert 0 < valid < 50_000


def test_set_flags_marks_hedge_copy() -> None:
    plain = encode(Header(stream_id=1, session=1, seq=5, send_time_ns=1, deadline_ns=2), b"p")
    hedged = set_flags(plain, FLAG_HEDGE_COPY)
    assert decode_header(hedged).flags == FLAG_HEDGE_COPY
    assert decode(hedged).payload == b"p"


def test_scapy_layer_decodes_named_fields() -> None:
    from scapy.layers.inet import IP, UDP

    from jasper.scapy_layer import Jasper, bind_port

    bind_port(17000)
    pkt = IP(bytes(IP(dst="127.0.0.1") / UDP(sport=40000, dport=17000) / GOLDEN_BYTES))
    j = pkt[Jasper]
    assert j.magic == 0x4A53
    assert j.seq == GOLDEN_HEADER.seq
    assert j.stream_id == GOLDEN_HEADER.stream_id
    assert j.deadline_ns == GOLDEN_HEADER.deadline_ns
    assert j.payload_len == 5 and j.msg_count == 1
    assert bytes(j.payload) == b"\x00\x03abc"
    # And building with Scapy gives bytes the codec accepts.
    built = bytes(Jasper(stream_id=9, session=1, seq=2, msg_count=1) / b"\x00\x03xyz")
    assert decode(built).header.seq == 2 and decode(built).payload == b"xyz"
