"""Scapy layer for the Jasper header, built from the wire spec, so a pcap decodes into named fields.

Import it only in tools and tests: scapy is large and the data-plane daemons never load it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from scapy.fields import (
    ByteField,
    Field,
    IntField,
    LongField,
    ShortField,
    StrFixedLenField,
    XShortField,
)
from scapy.layers.inet import UDP
from scapy.packet import Packet, bind_layers

from jasper.wire_spec import FIELDS, MAGIC, VERSION
from jasper.wire_spec import Field as WireField

_BY_CTYPE: dict[str, Any] = {"__u8": ByteField, "__u16": ShortField, "__u32": IntField}
_BY_CTYPE["__u64"] = LongField
_DEFAULTS = {"magic": MAGIC, "version": VERSION}


def _scapy_field(spec: WireField) -> Field[Any, Any]:
    if spec.name == "magic":
        return XShortField(spec.name, MAGIC)
    if spec.count:
        return StrFixedLenField(spec.name, bytes(spec.size), length=spec.size)
    field: Field[Any, Any] = _BY_CTYPE[spec.ctype](spec.name, _DEFAULTS.get(spec.name, 0))
    return field


class Jasper(Packet):
    """The Jasper data header; the payload follows as Raw."""

    name = "Jasper"
    fields_desc: ClassVar[list[Any]] = [_scapy_field(f) for f in FIELDS]

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        # Fill payload_len from the payload unless the caller set it (to build bad packets).
        if self.payload_len == 0 and pay:
            off = [f.name for f in FIELDS].index("payload_len")
            start = sum(f.size for f in FIELDS[:off])
            pkt = pkt[:start] + len(pay).to_bytes(2, "big") + pkt[start + 2 :]
        return pkt + pay


def bind_port(port: int) -> None:
    """Decode UDP traffic to or from `port` as Jasper."""
    bind_layers(UDP, Jasper, dport=port)
    bind_layers(UDP, Jasper, sport=port)
