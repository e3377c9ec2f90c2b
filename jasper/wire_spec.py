"""The Jasper datagram layout, written once: the Python codec, the native path and the C header
derive from it."""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = 0x4A53  # "JS"
VERSION = 3
"""Version 3: a datagram carries a batch of messages (`msg_count` blocks after the header) and
a MAC over header and payload (`key_epoch`, `mac`)."""

# Flags (bit values in the `flags` byte).
FLAG_HEDGE_COPY = 0x01
"""The copy was sent by a relay to a sibling's child (a hedge), not by the node's own parent."""
FLAG_RETRANSMIT = 0x02
"""The datagram was sent again by the publisher, answering a NAK (docs/recovery.md): receivers
treat it like any other copy (a duplicate of one they hold is dropped) and flag what it brings
recovered."""
FLAG_HEARTBEAT = 0x04
"""No market data: a keep-alive that carries send time and sequence only; never delivered to MPs."""
KNOWN_FLAGS = FLAG_HEDGE_COPY | FLAG_RETRANSMIT | FLAG_HEARTBEAT
"""The flags a data or heartbeat datagram may carry: what the data path (relays, receivers, the
eBPF programs) takes. FLAG_NAK is not among them, so a NAK that reaches a data port is
malformed ("flags") there and never forwarded."""
FLAG_NAK = 0x08
"""A NAK: a receiver endpoint asks the publisher for the sequence ranges in the payload (each a
NAK_RANGE_FIELDS record). Same header, MAC'd with the stream key like data; sent to the
publisher's port only, from the endpoint's own socket (the retransmission goes back there)."""

# Largest datagram we send: Ethernet MTU minus the IPv4 and UDP headers.
MTU = 1500
IPV4_HEADER = 20
UDP_HEADER = 8


@dataclass(frozen=True)
class Field:
    """One field of the header."""

    name: str
    """Field name, the same in Python and C."""
    ctype: str
    """Fixed-width C type: one of __u8, __u16, __u32, __u64 (network byte order on the wire)."""
    doc: str
    """One line for the wire-format document and the C header."""
    count: int = 0
    """0 for a number; n > 0 for an array of n bytes (ctype __u8), kept as bytes in Python."""

    @property
    def size(self) -> int:
        one = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8}[self.ctype]
        return one * self.count if self.count else one

    @property
    def align(self) -> int:
        """The alignment the field needs: its size for a number, 1 for a byte array."""
        return 1 if self.count else self.size

    @property
    def struct_code(self) -> str:
        if self.count:
            return f"{self.count}s"
        return {"__u8": "B", "__u16": "H", "__u32": "I", "__u64": "Q"}[self.ctype]

    @property
    def c_declaration(self) -> str:
        return (
            f"{self.ctype} {self.name}[{self.count}]" if self.count else f"{self.ctype} {self.name}"
        )


# The layout. Every field sits at an offset that is a multiple of its size, so the C struct has no
# implicit padding and eBPF can load each field with one aligned access.
FIELDS: tuple[Field, ...] = (
    Field("magic", "__u16", "0x4A53 ('JS'); anything else is not a Jasper datagram"),
    Field("version", "__u8", "header version, 3; other versions are rejected"),
    Field("flags", "__u8", "bit 0 hedge copy, 1 retransmit, 2 heartbeat, 3 NAK; others zero"),
    Field("stream_id", "__u32", "market-data stream"),
    Field("session", "__u32", "publisher session (epoch); a restarted publisher takes a new one"),
    Field("plan_epoch", "__u32", "tree plan the message was sent under (make-before-break)"),
    Field("seq", "__u64", "sequence number of the first message within (stream, session), from 1"),
    Field("send_time_ns", "__u64", "root send time, ns since the Unix epoch on the root's clock"),
    Field("deadline_ns", "__u64", "release time of every message, ns since the epoch; 0 = at once"),
    Field("payload_len", "__u16", "bytes of payload that follow the header"),
    Field("msg_count", "__u16", "messages in the payload: 0 for a heartbeat, >= 1 for data"),
    Field("key_epoch", "__u32", "epoch of the stream key the MAC was made with (rotation)"),
    Field("mac", "__u8", "HMAC-SHA256, first 16 bytes (docs/wire-format.md, MAC)", count=16),
)


def offsets(fields: tuple[Field, ...] = FIELDS) -> dict[str, int]:
    """Offset of every field from the start of the header (of `fields`' layout), in bytes."""
    out: dict[str, int] = {}
    at = 0
    for f in fields:
        if at % f.align:
            raise AssertionError(f"field {f.name} at {at} is not aligned to {f.align}")
        out[f.name] = at
        at += f.size
    return out


HEADER_LEN = sum(f.size for f in FIELDS)
STRUCT_FORMAT = "!" + "".join(f.struct_code for f in FIELDS)
MAX_PAYLOAD = MTU - IPV4_HEADER - UDP_HEADER - HEADER_LEN
MAX_DATAGRAM = HEADER_LEN + MAX_PAYLOAD

# The payload of a data datagram: `msg_count` message blocks back to back, each a length (u16,
# network byte order) and that many bytes; message i has sequence number seq + i. The blocks
# fill the payload exactly.
BLOCK_HEADER_LEN = 2
MAX_MESSAGE = MAX_PAYLOAD - BLOCK_HEADER_LEN
"""Largest single message: one block filling the payload."""
MAX_MESSAGES = MAX_PAYLOAD // BLOCK_HEADER_LEN
"""Most messages one datagram can carry (all empty)."""

# MAC: HMAC-SHA256 (RFC 2104) keyed by the stream key of `key_epoch`, truncated to its first
# MAC_LEN bytes (as RFC 4868 does), over the header's first MAC_OFFSET bytes with the hedge-copy
# flag cleared (relays set it on the copies they hedge), then the payload. docs/security.md says
# why this primitive.
MAC_LEN = 16
MAC_OFFSET = 48
"""Where the MAC sits in the header: every byte before it is covered, except the hedge bit."""
MAC_DIGEST = "sha256"
KEY_LEN = 32
"""Bytes of a stream key."""

MALFORMED_REASONS: tuple[str, ...] = (
    "short",
    "magic",
    "version",
    "flags",
    "length",
    "count",
    "overrun",
)
"""Why a datagram was dropped as malformed, in the order the checks run (stable counter names):
short: fewer bytes than the header; magic; version; flags: unknown bits; length: payload_len
differs from the bytes that follow or exceeds MAX_PAYLOAD; count: msg_count disagrees with the
blocks (bytes left after the last block, 0 for data, not 0 for a heartbeat); overrun: a block's
length runs past the end of the datagram."""

REJECT_REASONS: tuple[str, ...] = ("stream", "key", "mac", "session", "ahead")
"""Why a well-formed datagram was refused, in the order the checks run (stable counter names):
stream: a stream the node is not configured for; key: a key epoch the node holds no key for;
mac: the MAC does not match; session: not the publisher session the control plane announced;
ahead: its sequence number lies further ahead of the newest accepted one than the window."""


# The payload of a NAK (flags == FLAG_NAK): `msg_count` ranges back to back, filling it exactly;
# the header's seq is the first range's first_seq, deadline_ns 0, send_time_ns the receiver's
# clock when it sent the NAK. docs/recovery.md.
NAK_RANGE_FIELDS: tuple[Field, ...] = (
    Field("first_seq", "__u64", "first missing sequence number of the range"),
    Field("count", "__u32", "missing sequence numbers from first_seq on, >= 1"),
    Field("attempt", "__u16", "1 for the first NAK of the range, then 2, 3, ..."),
    Field("reserved", "__u16", "0"),
)
NAK_RANGE_LEN = sum(f.size for f in NAK_RANGE_FIELDS)
NAK_RANGE_FORMAT = "!" + "".join(f.struct_code for f in NAK_RANGE_FIELDS)
MAX_NAK_RANGES = 32
"""Most ranges one NAK carries (a receiver sends a second NAK for more)."""
MAX_NAK_COUNT = 4096
"""Most sequence numbers one range may ask for: a wider hole (an outage, not a loss) is not
NAKed; the receiver reports it to the MP as a gap at once."""

NAK_REASONS: tuple[str, ...] = ("malformed", "stream", "key", "mac", "session", "source")
"""Why a publisher refused a NAK (stable counter names): malformed (not a NAK, or its ranges do
not fill the payload, or a range is empty or too wide); stream; key; mac; session (not the one
it sends under); source (not from an endpoint address of its plan)."""


def c_header() -> str:
    """The C header the eBPF programs include; `jasper gen-header` writes it to ebpf/include/."""
    lines = [
        "/* jasper_wire.h: the Jasper data header, shared by eBPF, the native path and Python. */",
        "/* GENERATED from jasper/wire_spec.py by `python -m jasper.wire_spec`; do not edit. */",
        "#ifndef JASPER_WIRE_H",
        "#define JASPER_WIRE_H",
        "",
        "#include <linux/types.h>",
        "",
        f"#define JASPER_MAGIC 0x{MAGIC:04X}",
        f"#define JASPER_VERSION {VERSION}",
        f"#define JASPER_FLAG_HEDGE_COPY 0x{FLAG_HEDGE_COPY:02X}",
        f"#define JASPER_FLAG_RETRANSMIT 0x{FLAG_RETRANSMIT:02X}",
        f"#define JASPER_FLAG_HEARTBEAT 0x{FLAG_HEARTBEAT:02X}",
        f"#define JASPER_FLAG_NAK 0x{FLAG_NAK:02X}",
        f"#define JASPER_HEADER_LEN {HEADER_LEN}",
        f"#define JASPER_MAX_PAYLOAD {MAX_PAYLOAD}",
        f"#define JASPER_BLOCK_HEADER_LEN {BLOCK_HEADER_LEN}",
        f"#define JASPER_MAX_MESSAGES {MAX_MESSAGES}",
        f"#define JASPER_MAC_LEN {MAC_LEN}",
        f"#define JASPER_MAC_OFFSET {MAC_OFFSET}",
        f"#define JASPER_KEY_LEN {KEY_LEN}",
        f"#define JASPER_NAK_RANGE_LEN {NAK_RANGE_LEN}",
        f"#define JASPER_MAX_NAK_RANGES {MAX_NAK_RANGES}",
        f"#define JASPER_MAX_NAK_COUNT {MAX_NAK_COUNT}",
        "",
        "/* All multi-byte fields are in network byte order. */",
        "struct jasper_hdr {",
    ]
    for f in FIELDS:
        lines.append(f"\t{f.c_declaration}; /* {f.doc} */")
    lines.append("} __attribute__((packed));")
    lines.append("")
    lines.append(f'_Static_assert(sizeof(struct jasper_hdr) == {HEADER_LEN}, "jasper_hdr size");')
    for name, off in offsets().items():
        lines.append(
            f"_Static_assert(__builtin_offsetof(struct jasper_hdr, {name}) == {off}, "
            f'"jasper_hdr.{name} offset");'
        )
    lines += ["", "/* One range of a NAK's payload (flags == JASPER_FLAG_NAK). */"]
    lines.append("struct jasper_nak_range {")
    for f in NAK_RANGE_FIELDS:
        lines.append(f"\t{f.c_declaration}; /* {f.doc} */")
    lines.append("} __attribute__((packed));")
    lines.append("")
    lines.append(
        f"_Static_assert(sizeof(struct jasper_nak_range) == {NAK_RANGE_LEN}, "
        '"jasper_nak_range size");'
    )
    for name, off in offsets(NAK_RANGE_FIELDS).items():
        lines.append(
            f"_Static_assert(__builtin_offsetof(struct jasper_nak_range, {name}) == {off}, "
            f'"jasper_nak_range.{name} offset");'
        )
    lines += ["", "#endif /* JASPER_WIRE_H */", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - generator entry point
    import sys

    sys.stdout.write(c_header())
