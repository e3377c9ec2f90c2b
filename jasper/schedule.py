"""Release schedule: messages held per endpoint until their deadline, in deadline order."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


class Release(NamedTuple, Generic[T]):
    """One message due for delivery to one endpoint.

    A NamedTuple rather than a dataclass: the release path builds one per endpoint right before
    a deadline, and a tuple is several times cheaper to make.
    """

    deadline_ns: int
    """The release time in force (never earlier than a previous deadline of the stream)."""
    stream_id: int
    """Stream of the message."""
    seq: int
    """Sequence number of the message."""
    endpoint: int
    """Index of the delivery endpoint within this receiver, 0..endpoints-1."""
    item: T
    """What to deliver (the payload, or whatever the caller keeps)."""


@dataclass
class ScheduleCounters:
    """Outcomes counted by the schedule."""

    scheduled: int = 0
    """Entries accepted into the schedule."""
    overflow: int = 0
    """Entries refused because the schedule was full."""
    clamped: int = 0
    """Entries whose deadline was raised to keep the stream's deadlines non-decreasing."""
    released: int = 0
    """Entries handed out by pop_due."""


# Heap entries are plain tuples (deadline, stream, seq, rank, tiebreak, endpoint, item): tuple
# comparison runs in C, and the unique tiebreak keeps `item` from ever being compared.
_Entry = tuple[int, int, int, int, int, int, T]


class ReleaseSchedule(Generic[T]):
    """A bounded min-heap of (deadline, stream, seq, rotated endpoint rank).

    Driven like aioquic: `push` entries, ask `get_timer()` for the next deadline, and call
    `pop_due(now_ns)` at or after it. Endpoints that share a message's deadline come out in an
    order that rotates with the sequence number, so no endpoint is always first.
    """

    def __init__(self, *, capacity: int, endpoints: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if endpoints < 1:
            raise ValueError(f"endpoints must be >= 1, got {endpoints}")
        self.capacity = capacity
        self.endpoints = endpoints
        self.counters = ScheduleCounters()
        self._heap: list[_Entry[T]] = []
        self._last_deadline: dict[int, int] = {}
        self._tiebreak = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(
        self,
        *,
        deadline_ns: int,
        stream_id: int,
        seq: int,
        endpoint: int,
        item: T,
        clamp: bool = True,
    ) -> bool:
        """Hold `item` for `endpoint` until the deadline. False (and counted) when full.
        `clamp=False`: a recovered message keeps its own deadline (see `order`)."""
        if not 0 <= endpoint < self.endpoints:
            raise ValueError(f"endpoint {endpoint} out of range 0..{self.endpoints - 1}")
        if len(self._heap) >= self.capacity:
            self.counters.overflow += 1
            return False
        deadline_ns, rank = self.order(
            deadline_ns=deadline_ns, stream_id=stream_id, seq=seq, endpoint=endpoint, clamp=clamp
        )
        entry = (deadline_ns, stream_id, seq, rank, next(self._tiebreak), endpoint, item)
        heapq.heappush(self._heap, entry)
        self.counters.scheduled += 1
        return True

    def order(
        self, *, deadline_ns: int, stream_id: int, seq: int, endpoint: int, clamp: bool = True
    ) -> tuple[int, int]:
        """The deadline in force and the endpoint's rank among those sharing it.

        Entries sort by (deadline, stream, seq, rank). Used by `push`, and by a release queue
        kept elsewhere (the receiver's C release thread) so both order releases alike.

        `clamp=False` (a retransmitted copy that fills a hole) keeps the message's own deadline
        and leaves the stream's floor alone: its deadline lies below the floor only because
        later messages were held before it came, and it is still released before them (they
        sort after it), at the instant every other MP gets it.
        """
        if not clamp:
            return deadline_ns, (endpoint - seq) % self.endpoints
        # A shrinking hold must not let a later message overtake an earlier one.
        floor = self._last_deadline.get(stream_id, 0)
        if deadline_ns < floor:
            deadline_ns = floor
            self.counters.clamped += 1
        else:
            self._last_deadline[stream_id] = deadline_ns
        return deadline_ns, (endpoint - seq) % self.endpoints

    def get_timer(self) -> int | None:
        """The earliest deadline held, or None when empty."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now_ns: int) -> list[Release[T]]:
        """Remove and return every entry whose deadline is at or before `now_ns`, in order."""
        out: list[Release[T]] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ns:
            deadline, stream_id, seq, _rank, _tie, endpoint, item = heapq.heappop(heap)
            out.append(Release(deadline, stream_id, seq, endpoint, item))
        self.counters.released += len(out)
        return out

    def pop_next(self) -> Release[T] | None:
        """Remove and return the earliest entry regardless of time (for draining on shutdown)."""
        if not self._heap:
            return None
        deadline, stream_id, seq, _rank, _tie, endpoint, item = heapq.heappop(self._heap)
        self.counters.released += 1
        return Release(deadline, stream_id, seq, endpoint, item)
