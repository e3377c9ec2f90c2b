"""Duplicate filter for hedged copies: a ring of the last sequence seen per slot."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    """What the filter decided about one copy."""

    ACCEPT = "accept"
    """First copy of this (session, seq): deliver or forward it."""
    DUPLICATE = "duplicate"
    """The slot already holds this seq: a later hedged copy."""
    STALE = "stale"
    """Older than the ring remembers, or from an older publisher session: dropped."""
    AHEAD = "ahead"
    """Further ahead of the newest accepted seq than the window allows: dropped, no state
    moved (only when `check` is given a window)."""


AHEAD_WINDOW = 1 << 20
"""How far (in messages) the node cores let a copy's seq lie beyond the newest accepted one of
its stream and session: further is refused (AHEAD) and moves no state."""
AHEAD_RESYNC = 64
"""Consecutive copies all beyond the window after which a ring takes the jump as real (the
stream moved on while this node was cut off) and accepts again."""


class DedupRing:
    """Last sequence number seen per slot, indexed by `seq & (size - 1)`.

    Assumption (the reordering window): copies of one message arrive before a message `size`
    sequence numbers later does. Within it the filter is exact; a copy from further behind is
    STALE rather than delivered twice. Sequence numbers start at 1 (0 marks an empty slot).

    Publisher sessions: a restarted publisher takes a larger session number and starts its
    sequence again, so a copy with a larger session empties the ring and is accepted; a copy
    from a smaller session is STALE (late hedges of the old session).
    """

    __slots__ = ("_mask", "_slots", "ahead_run", "highest", "session")

    def __init__(self, *, size: int = 4096) -> None:
        if size < 2 or size & (size - 1):
            raise ValueError(f"ring size must be a power of two >= 2, got {size}")
        self._mask = size - 1
        self._slots = [0] * size
        self.session: int | None = None
        """The publisher session the ring holds sequence numbers of."""
        self.highest = 0
        """The largest seq accepted in this session (0: none yet, and the window counts from
        there)."""
        self.ahead_run = 0
        """Copies refused AHEAD since the last accepted one."""

    @property
    def size(self) -> int:
        return self._mask + 1

    def seen(self, session: int, seq: int) -> bool:
        """Whether (session, seq) is held: `check` would call it DUPLICATE. Changes nothing."""
        return session == self.session and seq != 0 and self._slots[seq & self._mask] == seq

    def check(self, session: int, seq: int, ahead: int = 0) -> Verdict:
        """Classify one copy and remember it when accepted.

        With `ahead` > 0, a seq more than `ahead` beyond the newest accepted one is AHEAD and
        changes nothing, so one datagram cannot push the ring's slots out of reach of the real
        stream; after AHEAD_RESYNC such copies in a row the jump is taken as real.
        """
        if session != self.session:
            if self.session is not None and session < self.session:
                return Verdict.STALE
            self.session = session
            self._slots = [0] * (self._mask + 1)
            self.highest = 0
            self.ahead_run = 0
        if seq == 0:
            return Verdict.STALE
        # A fresh ring counts from 0: a session starts at seq 1, and a datagram may not set
        # the base far ahead either (a node joining late resyncs after AHEAD_RESYNC copies).
        if ahead and seq - self.highest > ahead:
            self.ahead_run += 1
            if self.ahead_run < AHEAD_RESYNC:
                return Verdict.AHEAD
        slot = seq & self._mask
        held = self._slots[slot]
        if held == seq:
            return Verdict.DUPLICATE
        if held > seq:
            return Verdict.STALE
        self._slots[slot] = seq
        self.ahead_run = 0
        if seq > self.highest:
            self.highest = seq
        return Verdict.ACCEPT


@dataclass
class DedupCounters:
    """How many copies each verdict got."""

    accepted: int = 0
    """First copies."""
    duplicates: int = 0
    """Later hedged copies dropped."""
    stale: int = 0
    """Copies older than the window or from an older session, dropped."""


class DedupFilter:
    """One DedupRing per (delivery endpoint, stream), created on first use."""

    def __init__(self, *, ring_size: int = 4096) -> None:
        DedupRing(size=ring_size)  # validates the size once, up front
        self._ring_size = ring_size
        self._rings: dict[tuple[str, int], DedupRing] = {}
        self.counters = DedupCounters()
        """Totals over all rings."""

    def check(self, endpoint: str, stream_id: int, session: int, seq: int) -> Verdict:
        key = (endpoint, stream_id)
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = DedupRing(size=self._ring_size)
        verdict = ring.check(session, seq)
        if verdict is Verdict.ACCEPT:
            self.counters.accepted += 1
        elif verdict is Verdict.DUPLICATE:
            self.counters.duplicates += 1
        else:
            self.counters.stale += 1
        return verdict
