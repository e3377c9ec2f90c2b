"""Header parsing on the hot path: decode_header's checks without building a Header object."""

from __future__ import annotations

import struct

from jasper.wire import WireError
from jasper.wire_spec import HEADER_LEN, KNOWN_FLAGS, MAGIC, MAX_PAYLOAD, STRUCT_FORMAT, VERSION

_HEADER = struct.Struct(STRUCT_FORMAT)
_UNKNOWN = ~KNOWN_FLAGS & 0xFF

Fields = tuple[int, int, int, int, int, int, int]
"""(flags, stream_id, session, plan_epoch, seq, send_time_ns, deadline_ns)."""


def peek(data: bytes) -> Fields:
    """Validate like jasper.wire.decode_header (same WireError reasons), return the fields.

    A relay or receiver parses every copy, most of them duplicates; building a frozen
    dataclass per copy costs more than the rest of the checks (tests/test_overlay_wire.py
    holds the two parsers to the same verdicts).
    """
    n = len(data)
    if n < HEADER_LEN:
        raise WireError("short", f"{n} bytes, header needs {HEADER_LEN}")
    (magic, version, flags, stream, session, epoch, seq, sent, deadline, plen, _r0, _r1) = (
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
    return flags, stream, session, epoch, seq, sent, deadline
