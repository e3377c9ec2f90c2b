"""Encode and decode Jasper datagrams (a header, then a batch of messages); the layout comes from
`jasper.wire_spec`."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace

from jasper.wire_spec import (
    BLOCK_HEADER_LEN,
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
_BLOCK = struct.Struct("!H")
_OFFSETS = offsets()
_FLAGS_OFFSET = _OFFSETS["flags"]

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


class WireError(ValueError):
    """A datagram is not a valid Jasper message. The only exception `decode` raises.

    `reason` is a short stable token for counters, one of `wire_spec.MALFORMED_REASONS`.
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
    """Sequence number of the first message within (stream, session), u64, starting at 1;
    message i of the batch has seq + i."""
    send_time_ns: int
    """Root send time in nanoseconds since the Unix epoch, on the root's clock."""
    deadline_ns: int
    """Release time of every message of the datagram, in nanoseconds since the Unix epoch; 0
    means deliver at once."""
    plan_epoch: int = 0
    """Tree plan epoch the message was sent under, u32."""
    flags: int = 0
    """Bit set of FLAG_* values."""
    payload_len: int = 0
    """Length of the payload (all message blocks) in bytes; `encode` fills it in."""
    msg_count: int = 0
    """Messages in the datagram (0 for a heartbeat); `encode` fills it in."""

    @property
    def is_heartbeat(self) -> bool:
        return bool(self.flags & FLAG_HEARTBEAT)


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded datagram: header and its batch of messages."""

    header: Header
    """The fixed header."""
    messages: tuple[bytes, ...]
    """Application messages (order-book updates, for instance); message i has seq + i."""

    @property
    def payload(self) -> bytes:
        """The one message of a single-message datagram (b"" for a heartbeat)."""
        if len(self.messages) > 1:
            raise ValueError(f"a batch of {len(self.messages)} messages has no single payload")
        return self.messages[0] if self.messages else b""


def _check_range(name: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise ValueError(f"{name}={value} out of range 0..{top}")


def encode(header: Header, payload: bytes = b"") -> bytes:
    """Serialize a datagram of one message (a heartbeat: none). Raises ValueError on a local
    misuse (a field out of range, a payload too large)."""
    return encode_batch(header, () if header.is_heartbeat else (payload,))


def pack_blocks(messages: Sequence[bytes]) -> bytes:
    """The payload of a datagram: each message as a length-prefixed block."""
    return b"".join(_BLOCK.pack(len(m)) + m for m in messages)


def unpack_blocks(payload: bytes | bytearray | memoryview) -> list[bytes]:
    """The messages of a payload of blocks (what an MP endpoint receives), in order; the
    inverse of `pack_blocks`. Raises WireError "overrun" when a block runs past the end."""
    out: list[bytes] = []
    at, end = 0, len(payload)
    while at < end:
        if at + BLOCK_HEADER_LEN > end:
            raise WireError("overrun", f"block header at {at} runs past the end at {end}")
        (n,) = _BLOCK.unpack_from(payload, at)
        at += BLOCK_HEADER_LEN
        if at + n > end:
            raise WireError("overrun", f"block of {n} bytes at {at} runs past the end at {end}")
        out.append(bytes(payload[at : at + n]))
        at += n
    return out


def encode_batch(header: Header, messages: Sequence[bytes]) -> bytes:
    """Serialize one datagram carrying `messages` (seq, seq+1, ...). ValueError on misuse."""
    if header.is_heartbeat and messages:
        raise ValueError("a heartbeat carries no messages")
    if not header.is_heartbeat and not messages:
        raise ValueError("a data datagram carries at least one message")
    for m in messages:
        if len(m) > 0xFFFF:
            raise ValueError(f"message of {len(m)} bytes exceeds a block")
    body = pack_blocks(messages)
    if len(body) > MAX_PAYLOAD:
        raise ValueError(
            f"payload of {len(body)} bytes ({len(messages)} messages) exceeds {MAX_PAYLOAD}"
        )
    for name in ("stream_id", "session", "plan_epoch"):
        _check_range(name, getattr(header, name), U32_MAX)
    for name in ("seq", "send_time_ns", "deadline_ns"):
        _check_range(name, getattr(header, name), U64_MAX)
    if len(messages) > 1:
        _check_range("last seq", header.seq + len(messages) - 1, U64_MAX)
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
            len(body),
            len(messages),
            0,
        )
        + body
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
        msg_count,
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
    if flags & FLAG_HEARTBEAT:
        if msg_count or payload_len:
            raise WireError("count", f"heartbeat with {msg_count} messages, {payload_len} bytes")
    elif msg_count == 0:
        raise WireError("count", "data datagram with no messages")
    return Header(
        stream_id=stream_id,
        session=session,
        seq=seq,
        send_time_ns=send_time_ns,
        deadline_ns=deadline_ns,
        plan_epoch=plan_epoch,
        flags=flags,
        payload_len=payload_len,
        msg_count=msg_count,
    )


def split_blocks(data: bytes | bytearray | memoryview, count: int) -> list[tuple[int, int]]:
    """(offset, length) of each of the `count` messages of a datagram whose header is valid;
    raises WireError "overrun" (a block runs past the end) or "count" (bytes left over)."""
    end = len(data)
    at = HEADER_LEN
    out: list[tuple[int, int]] = []
    for i in range(count):
        if at + BLOCK_HEADER_LEN > end:
            raise WireError("overrun", f"block {i} of {count} starts past the end at {at}")
        (n,) = _BLOCK.unpack_from(data, at)
        at += BLOCK_HEADER_LEN
        if at + n > end:
            raise WireError("overrun", f"block {i} of {count}: {n} bytes at {at}, datagram {end}")
        out.append((at, n))
        at += n
    if at != end:
        raise WireError("count", f"{end - at} bytes after the last of {count} blocks")
    return out


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse a whole datagram, its message blocks included; raises only WireError."""
    header = decode_header(data)
    blocks = split_blocks(data, header.msg_count)
    return Message(header=header, messages=tuple(bytes(data[o : o + n]) for o, n in blocks))


def set_flags(datagram: bytes, flags: int) -> bytes:
    """Return the datagram with its flags byte replaced (a relay marking hedge copies)."""
    return datagram[:_FLAGS_OFFSET] + bytes((flags,)) + datagram[_FLAGS_OFFSET + 1 :]


def with_header(message: Message, **changes: int) -> bytes:
    """Re-encode a datagram with some header fields changed."""
    return encode_batch(replace(message.header, **changes), message.messages)


_UNKNOWN_FLAGS = ~KNOWN_FLAGS & 0xFF

PeekFields = tuple[int, int, int, int, int, int, int, int]
"""(flags, stream_id, session, plan_epoch, seq, send_time_ns, deadline_ns, msg_count)."""


def peek(data: bytes) -> PeekFields:
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
    if flags & _UNKNOWN_FLAGS:
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


__all__ = [
    "HEADER_LEN",
    "MAX_PAYLOAD",
    "Header",
    "Message",
    "WireError",
    "decode",
    "decode_header",
    "encode",
    "encode_batch",
    "pack_blocks",
    "peek",
    "set_flags",
    "split_blocks",
    "unpack_blocks",
    "with_header",
]
