"""Encode and decode Jasper datagrams (a header, then a batch of messages); the layout comes from
`jasper.wire_spec`."""

from __future__ import annotations

import hmac
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from jasper.wire_spec import (
    BLOCK_HEADER_LEN,
    FLAG_HEARTBEAT,
    FLAG_HEDGE_COPY,
    FLAG_NAK,
    FLAG_RETRANSMIT,
    HEADER_LEN,
    KEY_LEN,
    KNOWN_FLAGS,
    MAC_DIGEST,
    MAC_LEN,
    MAC_OFFSET,
    MAGIC,
    MAX_NAK_COUNT,
    MAX_NAK_RANGES,
    MAX_PAYLOAD,
    NAK_RANGE_FORMAT,
    NAK_RANGE_LEN,
    STRUCT_FORMAT,
    VERSION,
    offsets,
)

_HEADER = struct.Struct(STRUCT_FORMAT)
_BLOCK = struct.Struct("!H")
_OFFSETS = offsets()
_FLAGS_OFFSET = _OFFSETS["flags"]
_KEY_EPOCH = struct.Struct("!I")
_KEY_EPOCH_OFFSET = _OFFSETS["key_epoch"]
_NO_MAC = bytes(MAC_LEN)

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
    key_epoch: int = 0
    """Epoch of the stream key the MAC was made with; `encode` fills it in from the key."""
    mac: bytes = _NO_MAC
    """The MAC (MAC_LEN bytes); zeros on an unauthenticated datagram."""

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


@dataclass(frozen=True, slots=True)
class StreamKey:
    """One epoch of a stream's MAC key, as the controller issues it."""

    epoch: int
    """Key epoch, u32 >= 1; carried in every datagram signed with it (0 means unsigned)."""
    key: bytes = b""
    """The secret, KEY_LEN bytes."""

    def __post_init__(self) -> None:
        if not 1 <= self.epoch <= U32_MAX:
            raise ValueError(f"key epoch {self.epoch} out of range 1..{U32_MAX}")
        if len(self.key) != KEY_LEN:
            raise ValueError(f"a stream key has {KEY_LEN} bytes, got {len(self.key)}")

    def __repr__(self) -> str:  # never print the secret into a log
        return f"StreamKey(epoch={self.epoch}, key=<{len(self.key)} bytes>)"


def mac_of(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """The MAC of a datagram under `key`: HMAC-SHA256 truncated to MAC_LEN bytes, over the
    header before the MAC field with the hedge-copy flag cleared, then the payload. The caller
    has checked that `data` holds at least a header."""
    view = memoryview(data)
    covered = b"".join(
        (
            view[:_FLAGS_OFFSET],
            bytes((view[_FLAGS_OFFSET] & ~FLAG_HEDGE_COPY & 0xFF,)),
            view[_FLAGS_OFFSET + 1 : MAC_OFFSET],
            view[HEADER_LEN:],
        )
    )
    return hmac.digest(key, covered, MAC_DIGEST)[:MAC_LEN]


def sign(datagram: bytes | bytearray, key: StreamKey) -> bytes:
    """The datagram with `key_epoch` set to the key's epoch and its MAC filled in."""
    out = bytearray(datagram)
    _KEY_EPOCH.pack_into(out, _KEY_EPOCH_OFFSET, key.epoch)
    out[MAC_OFFSET:HEADER_LEN] = mac_of(out, key.key)
    return bytes(out)


def key_epoch_of(data: bytes | bytearray | memoryview) -> int:
    """The key epoch of a datagram whose header was validated."""
    epoch: int = _KEY_EPOCH.unpack_from(data, _KEY_EPOCH_OFFSET)[0]
    return epoch


def mac_matches(data: bytes | bytearray | memoryview, keys: Mapping[int, bytes]) -> str | None:
    """Check a validated datagram's MAC against the keys held for its stream (epoch -> key).

    None when it matches; else the reject reason: "key" (no key of its epoch is held) or
    "mac" (the MAC is wrong). The comparison takes constant time.
    """
    key = keys.get(key_epoch_of(data))
    if key is None:
        return "key"
    if not hmac.compare_digest(mac_of(data, key), bytes(data[MAC_OFFSET:HEADER_LEN])):
        return "mac"
    return None


def encode(header: Header, payload: bytes = b"", *, key: StreamKey | None = None) -> bytes:
    """Serialize a datagram of one message (a heartbeat: none), signed with `key` when given.
    Raises ValueError on a local misuse (a field out of range, a payload too large)."""
    return encode_batch(header, () if header.is_heartbeat else (payload,), key=key)


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


def encode_batch(
    header: Header, messages: Sequence[bytes], *, key: StreamKey | None = None
) -> bytes:
    """Serialize one datagram carrying `messages` (seq, seq+1, ...), signed with `key` when
    given (else key_epoch and mac come from the header). ValueError on misuse."""
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
    _check_range("key_epoch", header.key_epoch, U32_MAX)
    if len(header.mac) != MAC_LEN:
        raise ValueError(f"mac of {len(header.mac)} bytes, the header holds {MAC_LEN}")
    datagram = (
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
            header.key_epoch,
            header.mac,
        )
        + body
    )
    return datagram if key is None else sign(datagram, key)


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
        key_epoch,
        mac,
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
        key_epoch=key_epoch,
        mac=mac,
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


def with_header(message: Message, *, key: StreamKey | None = None, **changes: Any) -> bytes:
    """Re-encode a datagram with some header fields changed (signed again with `key`)."""
    return encode_batch(replace(message.header, **changes), message.messages, key=key)


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
    (magic, version, flags, stream, session, epoch, seq, sent, deadline, plen, count, _k, _m) = (
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


_NAK_RANGE = struct.Struct(NAK_RANGE_FORMAT)


@dataclass(frozen=True, slots=True)
class NakRange:
    """Sequence numbers a receiver endpoint misses: first_seq .. first_seq + count - 1."""

    first_seq: int
    """First missing sequence number."""
    count: int
    """How many from first_seq on (1..MAX_NAK_COUNT)."""
    attempt: int = 1
    """1 for the first NAK of this range, then 2, 3, ... (retries)."""


@dataclass(frozen=True, slots=True)
class Nak:
    """A decoded NAK (docs/recovery.md)."""

    stream_id: int
    """Stream the ranges belong to."""
    session: int
    """Publisher session of the sequence numbers."""
    send_time_ns: int
    """The receiver's clock when it sent the NAK, in ns since the epoch."""
    ranges: tuple[NakRange, ...]
    """What is asked for, in the order the receiver listed it."""
    key_epoch: int = 0
    """Key epoch of the MAC (0: unsigned)."""


def encode_nak(
    *,
    stream_id: int,
    session: int,
    ranges: Sequence[NakRange],
    send_time_ns: int,
    key: StreamKey | None = None,
    key_bytes: tuple[int, bytes] | None = None,
) -> bytes:
    """A NAK datagram for `ranges` (1..MAX_NAK_RANGES), signed with `key` (or `key_bytes`:
    (epoch, key) as the cores hold them). ValueError on misuse."""
    if not 1 <= len(ranges) <= MAX_NAK_RANGES:
        raise ValueError(f"a NAK carries 1..{MAX_NAK_RANGES} ranges, got {len(ranges)}")
    body = bytearray()
    for r in ranges:
        _check_range("first_seq", r.first_seq, U64_MAX)
        if not 1 <= r.count <= MAX_NAK_COUNT:
            raise ValueError(f"range of {r.count} sequence numbers, expected 1..{MAX_NAK_COUNT}")
        _check_range("attempt", r.attempt, 0xFFFF)
        body += _NAK_RANGE.pack(r.first_seq, r.count, r.attempt, 0)
    _check_range("stream_id", stream_id, U32_MAX)
    _check_range("session", session, U32_MAX)
    _check_range("send_time_ns", send_time_ns, U64_MAX)
    datagram = (
        _HEADER.pack(
            MAGIC, VERSION, FLAG_NAK, stream_id, session, 0, ranges[0].first_seq, send_time_ns,
            0, len(body), len(ranges), 0, _NO_MAC,
        )
        + bytes(body)
    )  # fmt: skip
    if key is not None:
        return sign(datagram, key)
    if key_bytes is not None:
        return sign(datagram, StreamKey(key_bytes[0], key_bytes[1]))
    return datagram


def decode_nak(data: bytes | bytearray | memoryview) -> Nak:
    """Parse a NAK; raises only WireError ("short", "magic", "version", "flags": not exactly
    FLAG_NAK, "length", "count": the ranges do not fill the payload or a range is empty or
    wider than MAX_NAK_COUNT). The MAC is the caller's to check (mac_matches)."""
    n = len(data)
    if n < HEADER_LEN:
        raise WireError("short", f"{n} bytes, header needs {HEADER_LEN}")
    (magic, version, flags, stream, session, _e, _seq, sent, _d, plen, count, kep, _m) = (
        _HEADER.unpack_from(data)
    )
    if magic != MAGIC:
        raise WireError("magic", f"0x{magic:04x}")
    if version != VERSION:
        raise WireError("version", f"{version}")
    if flags != FLAG_NAK:
        raise WireError("flags", f"flags 0x{flags:02x} on a NAK")
    if plen != n - HEADER_LEN or plen > MAX_PAYLOAD:
        raise WireError("length", f"payload_len {plen}, got {n - HEADER_LEN} bytes")
    if not 1 <= count <= MAX_NAK_RANGES or plen != count * NAK_RANGE_LEN:
        raise WireError("count", f"{count} ranges in {plen} bytes")
    ranges = []
    for i in range(count):
        first, many, attempt, _r = _NAK_RANGE.unpack_from(data, HEADER_LEN + i * NAK_RANGE_LEN)
        if not 1 <= many <= MAX_NAK_COUNT or first == 0 or first + many - 1 > U64_MAX:
            raise WireError("count", f"range {i}: {many} from {first}")
        ranges.append(NakRange(first, many, attempt))
    return Nak(stream, session, sent, tuple(ranges), kep)


def retransmission(datagram: bytes, key: StreamKey | None) -> bytes:
    """A stored data datagram marked FLAG_RETRANSMIT (hedge bit clear) and signed again: the
    flag is covered by the MAC, so a receiver knows the publisher sent it as a retransmission."""
    flags = (datagram[_FLAGS_OFFSET] | FLAG_RETRANSMIT) & ~FLAG_HEDGE_COPY
    out = set_flags(datagram, flags)
    return sign(out, key) if key is not None else out


__all__ = [
    "HEADER_LEN",
    "MAX_PAYLOAD",
    "Header",
    "Message",
    "Nak",
    "NakRange",
    "StreamKey",
    "WireError",
    "decode",
    "decode_header",
    "decode_nak",
    "encode",
    "encode_batch",
    "encode_nak",
    "key_epoch_of",
    "mac_matches",
    "mac_of",
    "pack_blocks",
    "peek",
    "retransmission",
    "set_flags",
    "sign",
    "split_blocks",
    "unpack_blocks",
    "with_header",
]
