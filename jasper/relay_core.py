"""The relay core: which copies a relay forwards, and how each outgoing copy is flagged."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from jasper.dedup import AHEAD_WINDOW, DedupRing, Verdict
from jasper.wire import WireError, mac_matches, peek
from jasper.wire_spec import FLAG_HEARTBEAT, FLAG_HEDGE_COPY, KEY_LEN, offsets

_FLAGS_AT = offsets()["flags"]


@dataclass
class RelayCoreCounters:
    """What one relay node's core saw and decided."""

    malformed: Counter[str] = field(default_factory=Counter)
    """Datagrams dropped as not Jasper, by WireError.reason."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Well-formed datagrams refused, by wire_spec.REJECT_REASONS (unknown stream, key epoch,
    bad MAC, unannounced session, too far ahead): never forwarded."""
    accepted: int = 0
    """First copies of data datagrams, forwarded."""
    duplicates: int = 0
    """Later hedged copies (and repeated heartbeats) dropped."""
    stale: int = 0
    """Copies older than the dedup window or from an older session, dropped."""
    heartbeats: int = 0
    """Newest heartbeats, forwarded."""
    copies_from: Counter[str] = field(default_factory=Counter)
    """Valid copies per sender name."""
    kept_from: Counter[str] = field(default_factory=Counter)
    """Forwarded copies per sender name."""


class Forward(NamedTuple):
    """One copy to forward: the bytes for the node's own children and for hedge targets."""

    own: bytes
    """The datagram with the hedge flag clear (children of this relay)."""
    hedge: bytes
    """The datagram with the hedge flag set (children of siblings this relay hedges for)."""
    plan_epoch: int
    """The plan the message was sent under: its forwarding table is the one to use."""
    stream_id: int
    """The stream the message belongs to: a relay in several trees forwards by its table."""


class RelayCore:
    """Admission and flagging for one relay node, without sockets or clocks.

    A copy is considered only for a stream set with `set_stream`, and only with a valid MAC
    when the stream has keys (a user-space relay verifies before it forwards; an eBPF relay
    cannot, and forwards for the receivers to reject). A data copy is forwarded when its
    stream's DedupRing accepts (session, first seq) within the window ahead; a
    heartbeat when it is the newest of its stream (heartbeats carry no sequence of their own,
    and forwarding every hedged copy would multiply them down the tree). The same decisions
    are made in the kernel by ebpf/relay.bpf.c; this is their reference.
    """

    def __init__(self, *, ring_size: int = 4096) -> None:
        DedupRing(size=ring_size)  # validates the size once
        self.ring_size = ring_size
        self.counters = RelayCoreCounters()
        self._rings: dict[int, DedupRing] = {}
        self._last_heartbeat: dict[int, int] = {}
        self._streams: dict[int, tuple[dict[int, bytes] | None, int | None]] = {}

    def set_stream(
        self, stream_id: int, *, keys: Mapping[int, bytes] | None, session: int | None = None
    ) -> None:
        """Forward copies of `stream_id`: MAC-checked with `keys` (epoch -> key; None: an
        unauthenticated lab stream), of the announced `session` only (None: the newest seen).
        The same contract as ReceiverCore.set_stream."""
        held: dict[int, bytes] | None = None
        if keys is not None:
            held = {}
            for epoch, key in keys.items():
                if len(key) != KEY_LEN:
                    raise ValueError(f"a stream key has {KEY_LEN} bytes, got {len(key)}")
                held[epoch] = bytes(key)
        self._streams[stream_id] = (held, session)

    def drop_stream(self, stream_id: int) -> None:
        """Refuse copies of `stream_id` from now on and forget its dedup state; other streams
        keep theirs (the node no longer serves this stream)."""
        self._streams.pop(stream_id, None)
        self._rings.pop(stream_id, None)
        self._last_heartbeat.pop(stream_id, None)

    def streams(self) -> list[int]:
        """The stream ids this core forwards."""
        return sorted(self._streams)

    def datagram_received(self, data: bytes, sender: str) -> Forward | None:
        """One copy from `sender`: what to forward, or None (dropped and counted)."""
        c = self.counters
        try:
            flags, stream, session, epoch, seq, sent_ns, _deadline, _count = peek(data)
        except WireError as exc:
            c.malformed[exc.reason] += 1
            return None
        config = self._streams.get(stream)
        if config is None:
            c.rejected["stream"] += 1
            return None
        keys, announced = config
        if keys is not None and (reason := mac_matches(data, keys)) is not None:
            c.rejected[reason] += 1
            return None
        if announced is not None and session != announced:
            c.rejected["session"] += 1
            return None
        c.copies_from[sender] += 1
        if flags & FLAG_HEARTBEAT:
            if sent_ns <= self._last_heartbeat.get(stream, -1):
                c.duplicates += 1
                return None
            self._last_heartbeat[stream] = sent_ns
            c.heartbeats += 1
        else:
            ring = self._rings.get(stream)
            if ring is None:
                ring = self._rings[stream] = DedupRing(size=self.ring_size)
            verdict = ring.check(session, seq, AHEAD_WINDOW)
            if verdict is not Verdict.ACCEPT:
                if verdict is Verdict.DUPLICATE:
                    c.duplicates += 1
                elif verdict is Verdict.AHEAD:
                    c.rejected["ahead"] += 1
                else:
                    c.stale += 1
                return None
            c.accepted += 1
        c.kept_from[sender] += 1
        if flags & FLAG_HEDGE_COPY:
            own = data[:_FLAGS_AT] + bytes((flags & ~FLAG_HEDGE_COPY,)) + data[_FLAGS_AT + 1 :]
            return Forward(own, data, epoch, stream)
        hedge = data[:_FLAGS_AT] + bytes((flags | FLAG_HEDGE_COPY,)) + data[_FLAGS_AT + 1 :]
        return Forward(data, hedge, epoch, stream)
