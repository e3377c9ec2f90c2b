"""Datagram checks on the Python hot path: decode's verdicts without building objects."""

from __future__ import annotations

import struct

from jasper.wire import WireError
from jasper.wire_spec import (
    BLOCK_HEADER_LEN,
    FLAG_HEARTBEAT,
    HEADER_LEN,
    KNOWN_FLAGS,
    MAGIC,
    MAX_PAYLOAD,
    STRUCT_FORMAT,
    VERSION,
)

_HEADER = struct.Struct(STRUCT_FORMAT)
_UNKNOWN = ~KNOWN_FLAGS & 0xFF

Fields = tuple[int, int, int, int, int, int, int, int]
"""(flags, stream_id, session, plan_epoch, seq, send_time_ns, deadline_ns, msg_count)."""


def peek(data: bytes) -> Fields:
    """Validate like jasper.wire.decode (same WireError reasons, blocks included), return the
    header fields.

    A relay or receiver parses every copy, most of them duplicates; building a frozen
    dataclass per copy costs more than the rest of the checks (tests/test_overlay_fastwire.py
    holds the two parsers to the same verdicts).
    """
    n = len(data)
    if n < HEADER_LEN:
        raise WireError("short", f"{n} bytes, header needs {HEADER_LEN}")
    (magic, version, flags, stream, session, epoch, seq, sent, deadline, plen, count, _r1) = (
        _HEADER.unpack_from(data)
    )
    if magic != MAGIC:
        raise WireError("magic", f"0x{magic:04x}")
    if version != VERSION:
        raise WireError("version", f"{version}")
    if flags & _UNKNOWN:
        raise WireError("flags", f"unknown flags 0x{flags:02x}")
    if plen != n - HEADER_LEN:
        raise WireError("length", f"payload_len {plen}, got {n - HEADER_LEN} bytes")
    if plen > MAX_PAYLOAD:
        raise WireError("length", f"payload_len {plen} exceeds {MAX_PAYLOAD}")
    if flags & FLAG_HEARTBEAT:
        if count or plen:
            raise WireError("count", f"heartbeat with {count} messages, {plen} bytes")
        return flags, stream, session, epoch, seq, sent, deadline, count
    if count == 0:
        raise WireError("count", "data datagram with no messages")
    if count == 1:  # the common case of an unbatched feed: one block filling the payload
        if plen < BLOCK_HEADER_LEN:
            raise WireError("overrun", f"block 0 of 1 starts past the end at {HEADER_LEN}")
        length = (data[HEADER_LEN] << 8) | data[HEADER_LEN + 1]
        if length > plen - BLOCK_HEADER_LEN:
            raise WireError("overrun", f"block 0 of 1: {length} bytes, datagram {n}")
        if length < plen - BLOCK_HEADER_LEN:
            raise WireError("count", f"{plen - BLOCK_HEADER_LEN - length} bytes after the block")
        return flags, stream, session, epoch, seq, sent, deadline, count
    at = HEADER_LEN
    for i in range(count):
        if at + BLOCK_HEADER_LEN > n:
            raise WireError("overrun", f"block {i} of {count} starts past the end at {at}")
        at += BLOCK_HEADER_LEN + ((data[at] << 8) | data[at + 1])
        if at > n:
            raise WireError("overrun", f"block {i} of {count} runs past the end, datagram {n}")
    if at != n:
        raise WireError("count", f"{n - at} bytes after the last of {count} blocks")
    return flags, stream, session, epoch, seq, sent, deadline, count
