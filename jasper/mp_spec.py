"""The MP feed framing, written once: what a receiver hands an MP (docs/mp-feed.md); the Python
paths, the native path and the C header derive from it."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from jasper.wire_spec import BLOCK_HEADER_LEN, MAX_MESSAGES, MAX_PAYLOAD, Field, offsets

MP_MAGIC = 0x4A4D  # "JM"
MP_VERSION = 1

# Flags (bit values in the `flags` byte of every message header).
MP_FLAG_LATE = 0x01
"""Released after its deadline (its first copy came too late): fairness was not kept for it."""
MP_FLAG_GAP_BEFORE = 0x02
"""The sequence number before this one (same stream and session) was never delivered to this
endpoint before this message: one or more messages are missing (or come later, out of order)."""
MP_FLAG_RECOVERED = 0x04
"""The message came from a retransmission (NAK recovery, docs/recovery.md): with LATE it was
recovered after its deadline; without, in time and released at the deadline like any copy."""
MP_KNOWN_FLAGS = MP_FLAG_LATE | MP_FLAG_GAP_BEFORE | MP_FLAG_RECOVERED

# Every field sits at an offset that is a multiple of its size (no implicit padding in C).
MP_FIELDS: tuple[Field, ...] = (
    Field("magic", "__u16", "0x4A4D ('JM'); anything else is not a Jasper MP message"),
    Field("version", "__u8", "framing version, 1"),
    Field("flags", "__u8", "bit 0 late, bit 1 gap before, bit 2 recovered; others 0"),
    Field("stream_id", "__u32", "market-data stream"),
    Field("seq", "__u64", "sequence number of this message within (stream, session), from 1"),
    Field("release_ns", "__u64", "receiver clock when released, ns since the Unix epoch"),
    Field("deadline_ns", "__u64", "deadline held to (ns): the root's stamp or the stream's floor"),
    Field("session", "__u32", "publisher session; sequence numbers restart in a new one"),
    Field("length", "__u16", "bytes of message that follow this header"),
    Field("reserved", "__u16", "0"),
)


def mp_offsets() -> dict[str, int]:
    """Offset of every field from the start of a message header, in bytes."""
    return offsets(MP_FIELDS)


MP_HEADER_LEN = sum(f.size for f in MP_FIELDS)
MP_STRUCT_FORMAT = "!" + "".join(f.struct_code for f in MP_FIELDS)
MP_MAX_DELIVERY = MAX_PAYLOAD + MAX_MESSAGES * (MP_HEADER_LEN - BLOCK_HEADER_LEN)
"""Longest delivery datagram: a wire datagram's most messages, each with an MP header."""

_HEADER = struct.Struct(MP_STRUCT_FORMAT)


@dataclass(frozen=True, slots=True)
class MpMessage:
    """One message as an MP receives it."""

    stream_id: int
    """Market-data stream."""
    session: int
    """Publisher session."""
    seq: int
    """Sequence number within (stream, session)."""
    flags: int
    """MP_FLAG_* bits."""
    release_ns: int
    """The receiver's clock when it released the message, in ns since the epoch."""
    deadline_ns: int
    """The deadline the receiver held it to, in ns since the epoch: the root's stamp, raised to
    the stream's previous deadline when lower (0: unstamped)."""
    payload: bytes
    """The market-data message."""

    @property
    def late(self) -> bool:
        """Released after its deadline."""
        return bool(self.flags & MP_FLAG_LATE)

    @property
    def gap_before(self) -> bool:
        """The previous sequence number was not delivered before this message."""
        return bool(self.flags & MP_FLAG_GAP_BEFORE)

    @property
    def recovered(self) -> bool:
        """The message came from a retransmission (a NAK recovered it)."""
        return bool(self.flags & MP_FLAG_RECOVERED)


class MpFormatError(ValueError):
    """A delivery datagram that is not valid MP framing (the sender's fault, not the MP's)."""


def frame(
    blocks: bytes,
    *,
    stream_id: int,
    session: int,
    seq: int,
    count: int,
    flags: int,
    release_ns: int,
    deadline_ns: int,
) -> bytes:
    """One delivery datagram from a released wire datagram's message blocks (each a u16 length
    and the bytes, as the wire carries them; already checked by the receiver's parse): every
    message gets its header, `seq` counting up; MP_FLAG_GAP_BEFORE only on the first."""
    out = bytearray()
    at = 0
    pack = _HEADER.pack
    for i in range(count):
        length = (blocks[at] << 8) | blocks[at + 1]
        start = at + BLOCK_HEADER_LEN
        at = start + length
        out += pack(
            MP_MAGIC, MP_VERSION, flags if i == 0 else flags & ~MP_FLAG_GAP_BEFORE, stream_id,
            seq + i, release_ns, deadline_ns, session, length, 0,
        )  # fmt: skip
        out += blocks[start:at]
    return bytes(out)


def parse(data: bytes | bytearray | memoryview) -> list[MpMessage]:
    """The messages of one delivery datagram; MpFormatError when it is not valid framing."""
    out: list[MpMessage] = []
    n = len(data)
    at = 0
    while at < n:
        if n - at < MP_HEADER_LEN:
            raise MpFormatError(f"{n - at} bytes left, a header has {MP_HEADER_LEN}")
        magic, version, flags, stream, seq, release, deadline, session, length, _r = (
            _HEADER.unpack_from(data, at)
        )
        if magic != MP_MAGIC:
            raise MpFormatError(f"magic 0x{magic:04X}, expected 0x{MP_MAGIC:04X}")
        if version != MP_VERSION:
            raise MpFormatError(f"version {version}, expected {MP_VERSION}")
        at += MP_HEADER_LEN
        if at + length > n:
            raise MpFormatError(f"message of {length} bytes runs past the datagram")
        out.append(
            MpMessage(stream, session, seq, flags, release, deadline, bytes(data[at : at + length]))
        )
        at += length
    return out


def payloads(data: bytes | bytearray | memoryview) -> list[bytes]:
    """The market-data messages of one delivery datagram, in sequence order."""
    return [m.payload for m in parse(data)]


class GapTracker:
    """Next expected sequence number per (endpoint, stream): what sets MP_FLAG_GAP_BEFORE.

    Fed in release order. The first release of a stream at an endpoint, and the first of a new
    session, set the baseline and flag nothing (an MP that joins late misses what came before).
    A release whose first seq lies beyond the next expected one is a gap of that many messages;
    one below it (out of order, e.g. late) moves nothing back.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next: dict[tuple[int, int], tuple[int, int]] = {}

    def released(self, endpoint: int, stream_id: int, session: int, seq: int, count: int) -> int:
        """Book one release of `count` messages from `seq`; returns the messages skipped before
        it (0: no gap)."""
        key = (endpoint, stream_id)
        got = self._next.get(key)
        end = seq + count
        if got is None or got[0] != session:
            self._next[key] = (session, end)
            return 0
        expected = got[1]
        if end > expected:
            self._next[key] = (session, end)
        return seq - expected if seq > expected else 0


def c_header() -> str:
    """The C header of the MP framing; written to native/jasper_mp.h (`python -m
    jasper.mp_spec > native/jasper_mp.h`)."""
    lines = [
        "/* jasper_mp.h: the framing of what a receiver hands an MP (docs/mp-feed.md). */",
        "/* GENERATED from jasper/mp_spec.py by `python -m jasper.mp_spec`; do not edit. */",
        "#ifndef JASPER_MP_H",
        "#define JASPER_MP_H",
        "",
        "#include <linux/types.h>",
        "",
        f"#define JASPER_MP_MAGIC 0x{MP_MAGIC:04X}",
        f"#define JASPER_MP_VERSION {MP_VERSION}",
        f"#define JASPER_MP_FLAG_LATE 0x{MP_FLAG_LATE:02X}",
        f"#define JASPER_MP_FLAG_GAP_BEFORE 0x{MP_FLAG_GAP_BEFORE:02X}",
        f"#define JASPER_MP_FLAG_RECOVERED 0x{MP_FLAG_RECOVERED:02X}",
        f"#define JASPER_MP_HEADER_LEN {MP_HEADER_LEN}",
        f"#define JASPER_MP_MAX_DELIVERY {MP_MAX_DELIVERY}",
        "",
        "/* All multi-byte fields are in network byte order. */",
        "struct jasper_mp_hdr {",
    ]
    for f in MP_FIELDS:
        lines.append(f"\t{f.c_declaration}; /* {f.doc} */")
    lines.append("} __attribute__((packed));")
    lines.append("")
    lines.append(
        f'_Static_assert(sizeof(struct jasper_mp_hdr) == {MP_HEADER_LEN}, "jasper_mp_hdr size");'
    )
    for name, off in mp_offsets().items():
        lines.append(
            f"_Static_assert(__builtin_offsetof(struct jasper_mp_hdr, {name}) == {off}, "
            f'"jasper_mp_hdr.{name} offset");'
        )
    lines += ["", "#endif /* JASPER_MP_H */", ""]
    return "\n".join(lines)


__all__ = [
    "MP_FIELDS",
    "MP_FLAG_GAP_BEFORE",
    "MP_FLAG_LATE",
    "MP_FLAG_RECOVERED",
    "MP_HEADER_LEN",
    "MP_MAGIC",
    "MP_MAX_DELIVERY",
    "MP_VERSION",
    "GapTracker",
    "MpFormatError",
    "MpMessage",
    "frame",
    "mp_offsets",
    "parse",
    "payloads",
]

if __name__ == "__main__":  # pragma: no cover - generator entry point
    import sys

    sys.stdout.write(c_header())
