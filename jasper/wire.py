"""Encode and decode Jasper data datagrams; the layout comes from `jasper.wire_spec`."""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from jasper.wire_spec import (
    FLAG_HEARTBEAT,
    HEADER_LEN,
    KNOWN_FLAGS,
    MAGIC,
    MAX_PAYLOAD,
    STRUCT_FORMAT,
    VERSION,
    offsets,
)

_HEADER = struct.Struct(STRUCT_FORMAT)
_OFFSETS = offsets()
_FLAGS_OFFSET = _OFFSETS["flags"]

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


class WireError(ValueError):
    """A datagram is not a valid Jasper message. The only exception `decode` raises.

    `reason` is a short stable token for counters (e.g. "short", "magic", "version", "length").
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed header of one Jasper datagram."""

    stream_id: int
    """Market-data stream, u32."""
    session: int
    """Publisher session (epoch), u32; a restarted publisher takes a new one."""
    seq: int
    """Sequence number within (stream, session), u64, starting at 1."""
    send_time_ns: int
    """Root send time in nanoseconds since the Unix epoch, on the root's clock."""
    deadline_ns: int
    """Release time in nanoseconds since the Unix epoch; 0 means deliver at once."""
    plan_epoch: int = 0
    """Tree plan epoch the message was sent under, u32."""
    flags: int = 0
    """Bit set of FLAG_* values."""
    payload_len: int = 0
    """Length of the payload in bytes; `encode` fills it in."""

    @property
    def is_heartbeat(self) -> bool:
        return bool(self.flags & FLAG_HEARTBEAT)


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded datagram: header and payload."""

    header: Header
    """The fixed header."""
    payload: bytes
    """Application bytes (an order-book update, for instance)."""


def _check_range(name: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise ValueError(f"{name}={value} out of range 0..{top}")


def encode(header: Header, payload: bytes = b"") -> bytes:
    """Serialize one datagram. Raises ValueError on a local misuse (a field out of range)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    for name in ("stream_id", "session", "plan_epoch"):
        _check_range(name, getattr(header, name), U32_MAX)
    for name in ("seq", "send_time_ns", "deadline_ns"):
        _check_range(name, getattr(header, name), U64_MAX)
    if header.flags & ~KNOWN_FLAGS or header.flags < 0:
        raise ValueError(f"unknown flags 0x{header.flags:x}")
    return (
        _HEADER.pack(
            MAGIC,
            VERSION,
            header.flags,
            header.stream_id,
            header.session,
            header.plan_epoch,
            header.seq,
            header.send_time_ns,
            header.deadline_ns,
            len(payload),
            0,
            0,
        )
        + payload
    )


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and validate the header of a datagram; raises only WireError (remote's fault)."""
    if len(data) < HEADER_LEN:
        raise WireError("short", f"{len(data)} bytes, header needs {HEADER_LEN}")
    (
        magic,
        version,
        flags,
        stream_id,
        session,
        plan_epoch,
        seq,
        send_time_ns,
        deadline_ns,
        payload_len,
        _r0,
        _r1,
    ) = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise WireError("magic", f"0x{magic:04x}")
    if version != VERSION:
        raise WireError("version", f"{version}")
    if flags & ~KNOWN_FLAGS:
        raise WireError("flags", f"unknown flags 0x{flags:02x}")
    if payload_len != len(data) - HEADER_LEN:
        raise WireError("length", f"payload_len {payload_len}, got {len(data) - HEADER_LEN} bytes")
    if payload_len > MAX_PAYLOAD:
        raise WireError("length", f"payload_len {payload_len} exceeds {MAX_PAYLOAD}")
    return Header(
        stream_id=stream_id,
        session=session,
        seq=seq,
        send_time_ns=send_time_ns,
        deadline_ns=deadline_ns,
        plan_epoch=plan_epoch,
        flags=flags,
        payload_len=payload_len,
    )


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse a whole datagram; raises only WireError."""
    header = decode_header(data)
    return Message(header=header, payload=bytes(data[HEADER_LEN:]))


def set_flags(datagram: bytes, flags: int) -> bytes:
    """Return the datagram with its flags byte replaced (a relay marking hedge copies)."""
    return datagram[:_FLAGS_OFFSET] + bytes((flags,)) + datagram[_FLAGS_OFFSET + 1 :]


def with_header(message: Message, **changes: int) -> bytes:
    """Re-encode a message with some header fields changed."""
    return encode(replace(message.header, **changes), message.payload)


__all__ = [
    "HEADER_LEN",
    "MAX_PAYLOAD",
    "Header",
    "Message",
    "WireError",
    "decode",
    "decode_header",
    "encode",
    "set_flags",
    "with_header",
]
