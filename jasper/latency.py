"""Latency probe bookkeeping: probe wire format and per-peer one-way delay and jitter windows."""

from __future__ import annotations

import itertools
import struct
from collections import deque
from dataclasses import dataclass

PROBE_MAGIC = b"JPRB"
PROBE = 1
"""A probe: the origin's send time; the peer answers with an ECHO."""
ECHO = 2
"""An echo: the probe's send time plus the peer's receive time."""
_HEAD = struct.Struct("!4sBIQQ")
MAX_NAME = 64


class ProbeError(ValueError):
    """A datagram that is not a valid probe or echo (the remote peer's fault)."""


@dataclass(frozen=True)
class ProbePacket:
    """One probe or echo datagram."""

    kind: int
    """PROBE or ECHO."""
    seq: int
    """Probe number of the origin, per peer (u32)."""
    send_ns: int
    """Origin's clock when it sent the probe, in ns."""
    peer_rx_ns: int
    """Peer's clock when the probe arrived (0 in a PROBE), in ns."""
    sender: str
    """Node name of whoever sent this datagram."""

    def encode(self) -> bytes:
        name = self.sender.encode()
        if len(name) > MAX_NAME:
            raise ValueError(f"node name longer than {MAX_NAME} bytes: {self.sender!r}")
        return _HEAD.pack(PROBE_MAGIC, self.kind, self.seq, self.send_ns, self.peer_rx_ns) + name


def decode_probe(data: bytes) -> ProbePacket:
    if len(data) < _HEAD.size or len(data) > _HEAD.size + MAX_NAME:
        raise ProbeError("length")
    magic, kind, seq, send_ns, rx_ns = _HEAD.unpack_from(data)
    if magic != PROBE_MAGIC:
        raise ProbeError("magic")
    if kind not in (PROBE, ECHO):
        raise ProbeError("kind")
    try:
        sender = data[_HEAD.size :].decode()
    except UnicodeDecodeError as exc:
        raise ProbeError("name") from exc
    if not sender:
        raise ProbeError("name")
    return ProbePacket(kind, seq, send_ns, rx_ns, sender)


@dataclass(frozen=True)
class LinkSummary:
    """What a node reports about its link to one peer."""

    peer: str
    owd_ns: int
    """Median one-way delay (peer receive clock minus own send clock), in ns."""
    jitter_ns: int
    """Mean absolute difference of successive one-way delays, in ns (RFC 3550 style)."""
    rtt_ns: int
    """Median round trip, in ns; free of clock offsets, unlike owd_ns."""
    samples: int
    """Echoes in the window."""
    lost: int
    """Probes of the window that got no echo."""


def _median(values: list[int]) -> int:
    s = sorted(values)
    return s[len(s) // 2]


class LinkWindow:
    """The last `size` probes to one peer. Sans-IO: times come in as arguments."""

    def __init__(self, peer: str, *, size: int = 64) -> None:
        self.peer = peer
        self.size = size
        self.next_seq = 0
        self.sent: deque[int] = deque(maxlen=size)
        """Sequence numbers of recent probes."""
        self.owd: deque[int] = deque(maxlen=size)
        self.rtt: deque[int] = deque(maxlen=size)
        self.answered: set[int] = set()
        self.last_echo_ns: int | None = None
        self.first_probe_ns: int | None = None

    def probe(self, *, sender: str, now_ns: int) -> ProbePacket:
        """The next probe to send to the peer."""
        seq = self.next_seq
        self.next_seq = (self.next_seq + 1) & 0xFFFFFFFF
        if len(self.sent) == self.size:
            self.answered.discard(self.sent[0])
        self.sent.append(seq)
        if self.first_probe_ns is None:
            self.first_probe_ns = now_ns
        return ProbePacket(PROBE, seq, now_ns, 0, sender)

    def echo(self, packet: ProbePacket, *, now_ns: int) -> bool:
        """Account an echo; False when it answers no probe of the window (late, duplicate)."""
        if packet.seq not in self.sent or packet.seq in self.answered:
            return False
        self.answered.add(packet.seq)
        self.owd.append(packet.peer_rx_ns - packet.send_ns)
        self.rtt.append(now_ns - packet.send_ns)
        self.last_echo_ns = now_ns
        return True

    def silent_for_ns(self, now_ns: int) -> int:
        """How long the peer has not answered (since the first probe if it never did)."""
        since = self.last_echo_ns if self.last_echo_ns is not None else self.first_probe_ns
        return 0 if since is None else now_ns - since

    def summary(self) -> LinkSummary | None:
        if not self.owd:
            return None
        owd = list(self.owd)
        jitter = sum(abs(b - a) for a, b in itertools.pairwise(owd))
        jitter //= max(1, len(owd) - 1)
        # Probes sent in the last moment may still be on their way; they are not lost yet.
        recent = list(self.sent)[:-1]
        lost = sum(1 for s in recent if s not in self.answered)
        return LinkSummary(
            peer=self.peer,
            owd_ns=_median(owd),
            jitter_ns=jitter,
            rtt_ns=_median(list(self.rtt)),
            samples=len(owd),
            lost=lost,
        )


def echo_for(packet: ProbePacket, *, responder: str, now_ns: int) -> ProbePacket:
    """The answer to a PROBE: same seq and send time, our receive time."""
    return ProbePacket(ECHO, packet.seq, packet.send_ns, now_ns, responder)
