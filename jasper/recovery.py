"""Loss recovery inside the hold: a receiver's NAK schedule (NakTracker) and the publisher's
bounded retransmit buffer (RetransmitBuffer); no I/O, time as an argument (docs/recovery.md)."""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from jasper.wire import Nak, NakRange, StreamKey, retransmission
from jasper.wire_spec import MAX_NAK_COUNT, MAX_NAK_RANGES

U64 = (1 << 64) - 1

HEAD_WINDOW = 64
"""A first copy of a session with seq 2..HEAD_WINDOW opens the hole 1..seq-1 (the session's first
messages were lost here); a larger first seq is a node joining mid-stream and opens none."""

RECOVERY_COUNTER_NAMES: tuple[str, ...] = (
    "naks_sent",
    "naks_coalesced",
    "recovered",
    "recovered_late",
    "unrecoverable",
)
"""Keys of a receiver endpoint's recovery counters, in a stable order (the native twin uses the
same): naks_sent: NAK datagrams sent; naks_coalesced: ranges that rode in a NAK beside its first
one (asked for without a NAK of their own); recovered: messages a retransmission brought before
their deadline (held and released on time); recovered_late: messages a retransmission brought
after their deadline (released at once, flagged late and recovered); unrecoverable: missing
messages given up (every NAK attempt spent, a hole wider than MAX_NAK_COUNT, the gap table full,
or a new session): the MP sees them only as gap-before on the next message."""


@dataclass(frozen=True)
class RecoveryConfig:
    """When a receiver NAKs. Times in nanoseconds."""

    nak_delay_ns: int = 100_000
    """Wait after a hole is seen before the first NAK: a copy reordered on a hedged path may
    still come (the demo's links: p99 120 µs)."""
    nak_jitter_ns: int = 100_000
    """Uniform extra wait in [0, nak_jitter_ns], so receivers that miss the same message do not
    NAK at one instant; also how far ahead a due NAK takes along ranges not yet due."""
    retry_ns: int = 1_000_000
    """Wait for the retransmission before NAKing the range again (plus jitter)."""
    attempts: int = 4
    """NAKs per range; after the last one and retry_ns more, the range is given up."""
    max_gaps: int = 1024
    """Open ranges the tracker keeps (all endpoints together); beyond it a new hole is given up
    at once (counted unrecoverable)."""
    seed: int = 0
    """Seed of the jitter draws (a host takes one of its own, so hosts draw differently)."""

    def __post_init__(self) -> None:
        for name in ("nak_delay_ns", "nak_jitter_ns", "retry_ns", "seed"):
            value = getattr(self, name)
            if not 0 <= value <= U64:
                raise ValueError(f"{name} must be in 0..2^64-1, got {value}")
        if not 1 <= self.attempts <= 0xFFFF:
            raise ValueError(f"attempts must be in 1..65535, got {self.attempts}")
        if not 1 <= self.max_gaps <= 1 << 20:
            raise ValueError(f"max_gaps must be in 1..2^20, got {self.max_gaps}")


def mix64(x: int) -> int:
    """splitmix64's finalizer: the counter-based hash behind every jitter draw (the C twin,
    native/receiver_core.c jc_mix64, computes the same)."""
    z = (x + 0x9E3779B97F4A7C15) & U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def jitter_ns(seed: int, endpoint: int, stream: int, first: int, attempt: int, span: int) -> int:
    """The jitter of one NAK of a range: uniform in [0, span] from a hash of its identity, so the
    Python and native cores draw the same and no generator state is carried."""
    if span == 0:
        return 0
    h = mix64(seed ^ endpoint)
    h = mix64(h ^ stream)
    h = mix64(h ^ first)
    h = mix64(h ^ attempt)
    return h % (span + 1)


@dataclass(frozen=True, slots=True)
class NakRequest:
    """One NAK to send: from `endpoint`'s socket to the publisher."""

    endpoint: int
    """Index of the endpoint that misses the ranges."""
    stream_id: int
    """Stream of the ranges."""
    session: int
    """Publisher session of the ranges."""
    ranges: tuple[NakRange, ...]
    """1..MAX_NAK_RANGES ranges, in sequence order."""


class _Gap:
    """One open range of missing sequence numbers of an endpoint's stream."""

    __slots__ = ("attempt", "count", "due", "endpoint", "first", "session", "stream")

    def __init__(
        self, endpoint: int, stream: int, session: int, first: int, count: int, due: int
    ) -> None:
        self.endpoint = endpoint
        self.stream = stream
        self.session = session
        self.first = first
        self.count = count
        self.due = due
        self.attempt = 0
        """NAKs sent for this range so far."""


class NakTracker:
    """Which sequence numbers each endpoint misses, and when to NAK them.

    Fed in processing order: `data(...)` for every accepted data copy, `heartbeat(...)` for
    every authenticated heartbeat (its seq is the publisher's newest); `poll(now_ns)` returns
    the NAKs due, `next_due()` when to poll next. A hole is the run between the next sequence
    number expected (per endpoint and stream) and a later one that arrived.
    """

    def __init__(self, config: RecoveryConfig, *, endpoints: int) -> None:
        self.config = config
        self._gaps: list[_Gap] = []
        self._expected: dict[tuple[int, int], tuple[int, int]] = {}
        """(endpoint, stream) -> (session, next seq expected)."""
        self._counts: list[list[int]] = [[0, 0, 0] for _ in range(endpoints)]
        """Per endpoint: naks_sent, naks_coalesced, unrecoverable."""

    def set_endpoints(self, endpoints: int) -> None:
        """Grow to `endpoints` endpoints."""
        while len(self._counts) < endpoints:
            self._counts.append([0, 0, 0])

    def counts(self, endpoint: int) -> tuple[int, int, int]:
        """(naks_sent, naks_coalesced, unrecoverable) of one endpoint."""
        c = self._counts[endpoint]
        return c[0], c[1], c[2]

    @property
    def open_gaps(self) -> int:
        """Ranges waiting for a copy or a NAK."""
        return len(self._gaps)

    def missing(self, endpoint: int, stream: int) -> list[tuple[int, int]]:
        """(first, count) of the open ranges of one endpoint's stream, in sequence order."""
        return sorted(
            (g.first, g.count) for g in self._gaps if g.endpoint == endpoint and g.stream == stream
        )

    def data(
        self,
        endpoint: int,
        stream: int,
        session: int,
        seq: int,
        count: int,
        now_ns: int,
        *,
        retransmit: bool = False,
    ) -> int:
        """An accepted data copy of `count` messages from `seq`; the number of its messages
        that were in an open range. `retransmit`: the copy answers a NAK, so its messages
        before the next one expected that were in no open range had been given up: they
        leave `unrecoverable` (they came after all, counted recovered by the core)."""
        key = (endpoint, stream)
        got = self._expected.get(key)
        end = seq + count
        if got is None or got[0] != session:
            if got is not None:
                self._forget(endpoint, stream)
            self._expected[key] = (session, end)
            # A session starts at seq 1: a first copy a little later means the very first
            # messages were lost here (a node joining mid-stream sees a larger seq, no hole).
            if 1 < seq <= HEAD_WINDOW:
                self._open(endpoint, stream, session, 1, seq - 1, now_ns)
            return 0
        expected = got[1]
        if seq >= expected:
            if seq > expected:
                self._open(endpoint, stream, session, expected, seq - expected, now_ns)
            self._expected[key] = (session, end)
            return 0
        if end > expected:
            self._expected[key] = (session, end)
        filled = self._fill(endpoint, stream, seq, end) if self._gaps else 0
        if retransmit:
            counts = self._counts[endpoint]
            counts[2] = max(0, counts[2] - (min(end, expected) - seq - filled))
        return filled

    def heartbeat(self, endpoint: int, stream: int, session: int, seq: int, now_ns: int) -> None:
        """An authenticated heartbeat: `seq` is the newest the publisher had sent, so anything
        up to it not seen yet is missing (the tail of a burst, when no later message comes)."""
        key = (endpoint, stream)
        got = self._expected.get(key)
        if got is None or got[0] != session or seq < got[1]:
            return
        self._open(endpoint, stream, session, got[1], seq + 1 - got[1], now_ns)
        self._expected[key] = (session, seq + 1)

    def next_due(self) -> int | None:
        """When the earliest open range wants a NAK (or to be given up), in ns; None: none."""
        if not self._gaps:
            return None
        return min(g.due for g in self._gaps)

    def poll(self, now_ns: int) -> list[NakRequest]:
        """The NAKs due at `now_ns`, grouped per (endpoint, stream, session) into datagrams of
        up to MAX_NAK_RANGES ranges; ranges whose last attempt has expired are given up."""
        gaps = self._gaps
        if not gaps:
            return []
        due_keys = sorted({(g.endpoint, g.stream, g.session) for g in gaps if g.due <= now_ns})
        if not due_keys:
            return []
        cfg = self.config
        horizon = now_ns + cfg.nak_jitter_ns
        out: list[NakRequest] = []
        given_up: set[int] = set()
        for endpoint, stream, session in due_keys:
            group = sorted(
                (
                    g
                    for g in gaps
                    if g.endpoint == endpoint
                    and g.stream == stream
                    and g.session == session
                    and g.due <= horizon
                ),
                key=lambda g: g.first,
            )
            counts = self._counts[endpoint]
            ranges: list[NakRange] = []
            for g in group:
                if g.attempt >= cfg.attempts:
                    given_up.add(id(g))
                    counts[2] += g.count
                    continue
                g.attempt += 1
                g.due = (
                    now_ns
                    + cfg.retry_ns
                    + jitter_ns(cfg.seed, endpoint, stream, g.first, g.attempt, cfg.nak_jitter_ns)
                )
                ranges.append(NakRange(g.first, g.count, g.attempt))
            for at in range(0, len(ranges), MAX_NAK_RANGES):
                chunk = tuple(ranges[at : at + MAX_NAK_RANGES])
                out.append(NakRequest(endpoint, stream, session, chunk))
                counts[0] += 1
                counts[1] += len(chunk) - 1
        if given_up:
            self._gaps = [g for g in gaps if id(g) not in given_up]
        return out

    # Internals

    def _open(
        self, endpoint: int, stream: int, session: int, first: int, count: int, now_ns: int
    ) -> None:
        cfg = self.config
        if count > MAX_NAK_COUNT or len(self._gaps) >= cfg.max_gaps:
            self._counts[endpoint][2] += count
            return
        due = (
            now_ns
            + cfg.nak_delay_ns
            + jitter_ns(cfg.seed, endpoint, stream, first, 0, cfg.nak_jitter_ns)
        )
        self._gaps.append(_Gap(endpoint, stream, session, first, count, due))

    def _fill(self, endpoint: int, stream: int, seq: int, end: int) -> int:
        """Take [seq, end) out of the endpoint's open ranges of `stream`; the number of
        messages taken."""
        filled = 0
        # Open ranges counting this call's changes so far: a split never takes the table
        # past max_gaps (counting only the ranges kept so far did, by the ranges after it).
        total = len(self._gaps)
        kept: list[_Gap] = []
        for g in self._gaps:
            g_end = g.first + g.count
            if g.endpoint != endpoint or g.stream != stream or end <= g.first or seq >= g_end:
                kept.append(g)
                continue
            filled += min(end, g_end) - max(seq, g.first)
            total -= 1
            if g.first < seq:  # the part before the copy stays open
                left = _Gap(endpoint, stream, g.session, g.first, seq - g.first, g.due)
                left.attempt = g.attempt
                kept.append(left)
                total += 1
            if end < g_end:  # and the part after it
                if total >= self.config.max_gaps:
                    self._counts[endpoint][2] += g_end - end
                    continue
                total += 1
                right = _Gap(endpoint, stream, g.session, end, g_end - end, g.due)
                right.attempt = g.attempt
                kept.append(right)
        self._gaps = kept
        return filled

    def _forget(self, endpoint: int, stream: int) -> None:
        """A new session: the old one's open ranges can no longer be asked for."""
        kept: list[_Gap] = []
        for g in self._gaps:
            if g.endpoint == endpoint and g.stream == stream:
                self._counts[endpoint][2] += g.count
            else:
                kept.append(g)
        self._gaps = kept


PUBLISHER_RECOVERY_COUNTERS: tuple[str, ...] = (
    "naks_received",
    "naks_refused",
    "ranges_requested",
    "retransmits_sent",
    "retransmits_coalesced",
    "retransmits_missing",
    "retransmits_capped",
)
"""Keys of the publisher's recovery counters: naks_received: NAK datagrams that passed every
check; naks_refused: refused, by reason (wire_spec.NAK_REASONS, a dict); ranges_requested:
ranges in accepted NAKs; retransmits_sent: datagrams sent again; retransmits_coalesced:
requests for a datagram already sent again to the same endpoint within the coalescing window
(not sent twice); retransmits_missing: sequence numbers asked for that the buffer no longer (or
never) held; retransmits_capped: datagrams left out because one NAK asked for more than
max_per_nak."""


class RetransmitBuffer:
    """The publisher's last `capacity` data datagrams of its session, served to NAKs.

    `add` every datagram as sent (in sequence order); `serve(nak, dest, now_ns)` returns the
    retransmissions to send to `dest` (FLAG_RETRANSMIT set, signed again). A datagram already
    sent again to the same destination within `coalesce_ns` is not sent again (a NAK retried,
    or repeated by several ranges, costs one retransmission).
    """

    def __init__(
        self,
        *,
        capacity: int = 65536,
        coalesce_ns: int = 250_000,
        max_per_nak: int = 512,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if coalesce_ns < 0:
            raise ValueError(f"coalesce_ns must be >= 0, got {coalesce_ns}")
        if max_per_nak < 1:
            raise ValueError(f"max_per_nak must be >= 1, got {max_per_nak}")
        self.capacity = capacity
        self.coalesce_ns = coalesce_ns
        self.max_per_nak = max_per_nak
        self._firsts: list[int] = []
        """First seqs of the held datagrams, ascending (evicted from `_start` on)."""
        self._start = 0
        self._held: dict[int, tuple[int, bytes]] = {}
        """First seq -> (message count, datagram as sent)."""
        self._sent: dict[tuple[tuple[str, int], int], int] = {}
        """(destination, first seq) -> when it was last sent again."""
        self._sent_order: deque[tuple[int, tuple[tuple[str, int], int]]] = deque()
        self.session: int | None = None
        self.counts: dict[str, int] = {n: 0 for n in PUBLISHER_RECOVERY_COUNTERS[2:]}
        self.counts["naks_received"] = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, session: int, seq: int, count: int, datagram: bytes) -> None:
        """Keep one data datagram (messages seq .. seq + count - 1) as sent."""
        if session != self.session:
            self._firsts, self._start, self._held = [], 0, {}
            self.session = session
        self._firsts.append(seq)
        self._held[seq] = (count, datagram)
        if len(self._held) > self.capacity:
            old = self._firsts[self._start]
            del self._held[old]
            self._start += 1
            if self._start > 4096 and self._start * 2 > len(self._firsts):
                del self._firsts[: self._start]  # amortized: the list never grows unbounded
                self._start = 0

    def serve(
        self, nak: Nak, dest: tuple[str, int], now_ns: int, key: StreamKey | None
    ) -> list[bytes]:
        """The retransmissions answering `nak` (already authenticated, of this session)."""
        c = self.counts
        c["naks_received"] += 1
        self._expire(now_ns)
        firsts, start = self._firsts, self._start
        out: list[bytes] = []
        for r in nak.ranges:
            c["ranges_requested"] += 1
            seq, end = r.first_seq, r.first_seq + r.count
            while seq < end:
                i = bisect.bisect_right(firsts, seq, start) - 1
                if i < start or seq >= firsts[i] + self._held[firsts[i]][0]:
                    # Not held (evicted, or never sent): up to the next datagram held.
                    j = max(i + 1, start)
                    nxt = firsts[j] if j < len(firsts) else end
                    c["retransmits_missing"] += min(nxt, end) - seq
                    seq = min(nxt, end)
                    continue
                first = firsts[i]
                count, datagram = self._held[first]
                seq = first + count
                slot = (dest, first)
                last = self._sent.get(slot)
                if last is not None and now_ns - last < self.coalesce_ns:
                    c["retransmits_coalesced"] += 1
                    continue
                if len(out) >= self.max_per_nak:
                    c["retransmits_capped"] += 1
                    continue
                self._sent[slot] = now_ns
                self._sent_order.append((now_ns, slot))
                out.append(retransmission(datagram, key))
        c["retransmits_sent"] += len(out)
        return out

    def _expire(self, now_ns: int) -> None:
        order, sent = self._sent_order, self._sent
        while order and now_ns - order[0][0] >= self.coalesce_ns:
            when, slot = order.popleft()
            if sent.get(slot) == when:
                del sent[slot]


__all__ = [
    "PUBLISHER_RECOVERY_COUNTERS",
    "RECOVERY_COUNTER_NAMES",
    "NakRequest",
    "NakTracker",
    "RecoveryConfig",
    "RetransmitBuffer",
    "jitter_ns",
    "mix64",
]
