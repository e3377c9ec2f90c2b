"""ReceiverCore: a receiver host's per-copy work (parse, emulated arrival, admission, hold,
release order, counters) without I/O or clock; the contract is docs/receiver-core.md."""

from __future__ import annotations

import heapq
import hmac
import struct
from collections.abc import Mapping
from enum import IntEnum
from typing import NamedTuple

from jasper.dedup import AHEAD_WINDOW, DedupRing, Verdict
from jasper.mp_spec import MP_FLAG_GAP_BEFORE, MP_FLAG_LATE, MP_FLAG_RECOVERED, GapTracker
from jasper.recovery import RECOVERY_COUNTER_NAMES, NakTracker, RecoveryConfig
from jasper.schedule import ReleaseSchedule
from jasper.wire import encode_nak, mac_of
from jasper.wire_spec import (
    BLOCK_HEADER_LEN,
    FLAG_HEARTBEAT,
    FLAG_RETRANSMIT,
    HEADER_LEN,
    KEY_LEN,
    KNOWN_FLAGS,
    MAC_OFFSET,
    MAGIC,
    MALFORMED_REASONS,
    MAX_DATAGRAM,
    MAX_PAYLOAD,
    REJECT_REASONS,
    STRUCT_FORMAT,
    VERSION,
)

U32_MAX = 2**32 - 1


class ReleaseKind(IntEnum):
    """Why a message was released when it was."""

    ON_TIME = 0
    """Held and released at its deadline in force (or by `flush`)."""
    LATE = 1
    """Its deadline had passed when the first copy was processed: released at once."""
    UNSTAMPED = 2
    """Deadline 0 in the header: released at once."""
    OVERFLOW = 3
    """The hold was full: released at once rather than dropped."""


class CoreRelease(NamedTuple):
    """One datagram's messages handed to one endpoint.

    A NamedTuple: one is built per release on the hot path, and tuples are cheap to make.
    """

    endpoint: int
    """Index of the MP endpoint, 0..endpoints-1."""
    parent: int
    """The pump's id of the sender whose copy was kept."""
    stream_id: int
    """Market-data stream."""
    session: int
    """Publisher session of the datagram."""
    seq: int
    """Sequence number of the first message; message i has seq + i."""
    # The contract names the field `count`; it shadows tuple.count, which nobody calls here.
    count: int  # type: ignore[assignment]
    """Messages in the datagram (msg_count)."""
    kind: ReleaseKind
    """ON_TIME, LATE, UNSTAMPED or OVERFLOW."""
    deadline_ns: int
    """The deadline in force in ns (raised by the per-stream clamp when held; 0 when unstamped)."""
    send_ns: int
    """Root send time from the header, in ns."""
    arrival_ns: int
    """Effective arrival of the kept copy (receive time plus emulated link delay), in ns."""
    release_ns: int
    """The `now_ns` of the call that released it."""
    payload: bytes
    """The message blocks: every byte after the header."""
    flags: int = 0
    """MP flags of the delivery (jasper.mp_spec): MP_FLAG_LATE for a LATE release,
    MP_FLAG_RECOVERED when the kept copy was a retransmission, and MP_FLAG_GAP_BEFORE when its
    first seq lies beyond the next one expected for its endpoint and stream (it applies to the
    first message only)."""


class CoreNak(NamedTuple):
    """One NAK datagram to send from an endpoint's socket to the publisher."""

    endpoint: int
    """Index of the endpoint whose socket sends it (the retransmission comes back there)."""
    stream_id: int
    """Stream of the ranges."""
    session: int
    """Publisher session of the ranges."""
    data: bytes
    """The datagram (jasper.wire.encode_nak, signed with the stream's newest key epoch)."""


COUNTER_NAMES: tuple[str, ...] = (
    "received",
    "heartbeats",
    "accepted",
    "duplicates",
    "stale",
    "released",
    "late",
    "hold_overflow",
    "pending_overflow",
    "gaps",
    "gap_messages",
    *(f"malformed_{reason}" for reason in MALFORMED_REASONS),
    *(f"rejected_{reason}" for reason in REJECT_REASONS),
)
"""Keys of `ReceiverCore.counters(endpoint)`, in a stable order (the native twin uses the same):
received: copies handed in (pending overflow included); heartbeats: heartbeat copies parsed;
accepted, duplicates, stale: admission verdicts; released: messages released, any kind; late:
messages released LATE; hold_overflow: datagrams released OVERFLOW; pending_overflow: future
copies refused because the pending set was full; gaps: releases flagged gap-before (a seq
skipped at this endpoint, in release order); gap_messages: the sequence numbers so skipped (one
may still come later, out of order); malformed_<reason>: copies dropped by the parse;
rejected_<reason>: well-formed copies refused by authentication or sequence hygiene."""


# Counter indices into each endpoint's list: a list of ints is cheaper per copy than a dict.
_RECEIVED = 0
_HEARTBEATS = 1
_ACCEPTED = 2
_DUPLICATES = 3
_STALE = 4
_RELEASED = 5
_LATE = 6
_HOLD_OVERFLOW = 7
_PENDING_OVERFLOW = 8
_GAPS = 9
_GAP_MESSAGES = 10
_MALFORMED = 11
_MALFORMED_LENGTH = _MALFORMED + MALFORMED_REASONS.index("length")
_REJECTED = _MALFORMED + len(MALFORMED_REASONS)
_REJECT_STREAM, _REJECT_KEY, _REJECT_MAC, _REJECT_SESSION, _REJECT_AHEAD = (
    _REJECTED + REJECT_REASONS.index(r) for r in ("stream", "key", "mac", "session", "ahead")
)

# Indices into MALFORMED_REASONS, looked up once: _parse returns one of these on a bad datagram.
_SHORT, _MAGIC, _VERSION, _FLAGS, _LENGTH, _COUNT, _OVERRUN = (
    MALFORMED_REASONS.index(r)
    for r in ("short", "magic", "version", "flags", "length", "count", "overrun")
)

_HEADER = struct.Struct(STRUCT_FORMAT)
_UNKNOWN_FLAGS = ~KNOWN_FLAGS & 0xFF

_Fields = tuple[int, int, int, int, int, int, int, int]
"""(flags, stream_id, session, seq, send_time_ns, deadline_ns, msg_count, key_epoch)."""

_Held = tuple[int, int, int, int, int, bytes, int]
"""What the hold keeps beside (deadline, stream, seq, endpoint): (parent, session, count,
send_ns, arrival_ns, payload, MP flags known when held: MP_FLAG_RECOVERED or 0)."""

_Pending = tuple[int, int, int, bytes, int]
"""(arrival_ns, receipt number, endpoint, data, parent): sorts by emulated arrival, then by the
order the copies were handed in."""


def _parse(data: bytes) -> _Fields | int:
    """The header fields, or the index of the malformed reason.

    Mirrors overlay.fastwire.peek check for check (overlay/ is not importable from jasper/, and
    jasper.wire.decode builds objects per copy); returning the reason instead of raising keeps a
    burst of garbage cheap. tests/test_receiver_core.py holds the verdicts equal to peek's.
    """
    n = len(data)
    if n < HEADER_LEN:
        return _SHORT
    (magic, version, flags, stream, session, _epoch, seq, sent, deadline, plen, count, kep, _m) = (
        _HEADER.unpack_from(data)
    )
    if magic != MAGIC:
        return _MAGIC
    if version != VERSION:
        return _VERSION
    if flags & _UNKNOWN_FLAGS:
        return _FLAGS
    if plen != n - HEADER_LEN or plen > MAX_PAYLOAD:
        return _LENGTH
    if flags & FLAG_HEARTBEAT:
        if count or plen:
            return _COUNT
        return flags, stream, session, seq, sent, deadline, count, kep
    if count == 0:
        return _COUNT
    if count == 1:  # an unbatched feed: one block filling the payload
        if plen < BLOCK_HEADER_LEN:
            return _OVERRUN
        length = (data[HEADER_LEN] << 8) | data[HEADER_LEN + 1]
        if length > plen - BLOCK_HEADER_LEN:
            return _OVERRUN
        if length < plen - BLOCK_HEADER_LEN:
            return _COUNT
        return flags, stream, session, seq, sent, deadline, count, kep
    at = HEADER_LEN
    for _ in range(count):
        if at + BLOCK_HEADER_LEN > n:
            return _OVERRUN
        at += BLOCK_HEADER_LEN + ((data[at] << 8) | data[at + 1])
        if at > n:
            return _OVERRUN
    if at != n:
        return _COUNT
    return flags, stream, session, seq, sent, deadline, count, kep


class ReceiverCore:
    """Copies in, releases out, driven like aioquic.

    Feed every copy with `datagram_received(endpoint, data, parent, arrival_ns, now_ns)`, call
    `timer(now_ns)` at or after `get_timer()`, pull `releases()`. Copies are processed in order
    of effective arrival, so the copy first in emulated time is the one kept; held messages
    come out in order of (deadline in force, stream, seq, rotated endpoint rank).
    """

    def __init__(
        self,
        *,
        endpoints: int,
        ring_size: int = 4096,
        hold_capacity: int = 65536,
        pending_capacity: int = 65536,
        ahead_window: int = AHEAD_WINDOW,
        recovery: RecoveryConfig | None = None,
    ) -> None:
        if ahead_window < 1:
            raise ValueError(f"ahead_window must be >= 1, got {ahead_window}")
        if endpoints < 1:
            raise ValueError(f"endpoints must be >= 1, got {endpoints}")
        if pending_capacity < 0:
            raise ValueError(f"pending_capacity must be >= 0, got {pending_capacity}")
        DedupRing(size=ring_size)  # validates the size once, up front
        self._ring_size = ring_size
        self._pending_capacity = pending_capacity
        self._endpoints = endpoints
        # The release order and the per-stream clamp are ReleaseSchedule's, so the core orders
        # releases exactly like every other user of the schedule.
        self._hold: ReleaseSchedule[_Held] = ReleaseSchedule(
            capacity=hold_capacity, endpoints=endpoints
        )
        self._pending: list[_Pending] = []
        self._receipts = 0
        self._counts: list[list[int]] = [[0] * len(COUNTER_NAMES) for _ in range(endpoints)]
        self._rings: list[dict[int, DedupRing]] = [{} for _ in range(endpoints)]
        self._parents: list[dict[int, list[int]]] = [{} for _ in range(endpoints)]
        self._releases: list[CoreRelease] = []
        self._gaps = GapTracker()
        self._ahead = ahead_window
        # stream id -> (keys by epoch, or None for an unauthenticated stream; announced
        # session, or None to follow the newest session seen).
        self._streams: dict[int, tuple[dict[int, bytes] | None, int | None]] = {}
        self._naks = NakTracker(recovery, endpoints=endpoints) if recovery is not None else None
        """Loss recovery (docs/recovery.md): None when the plan names no publisher to NAK."""
        self._nak_out: list[CoreNak] = []
        self._recovered: list[list[int]] = [[0, 0] for _ in range(endpoints)]
        """Per endpoint: messages recovered in time, recovered late."""

    # Inputs

    def set_stream(
        self, stream_id: int, *, keys: Mapping[int, bytes] | None, session: int | None = None
    ) -> None:
        """Accept copies of `stream_id` from now on (a plan or config named it).

        `keys` maps key epoch -> stream key (KEY_LEN bytes): a copy must carry a MAC made with
        one of them. None makes the stream unauthenticated (a lab topology without keys; the
        controller always issues keys). `session`: the publisher session the control plane
        announced; copies of any other session are refused. None follows the newest session
        seen, as a DedupRing does. Calling again replaces both (key rotation, a new session);
        copies of streams never set are refused ("stream").
        """
        if not 0 <= stream_id <= U32_MAX:
            raise ValueError(f"stream {stream_id} out of range 0..{U32_MAX}")
        if session is not None and not 0 <= session <= U32_MAX:
            raise ValueError(f"session {session} out of range 0..{U32_MAX}")
        held: dict[int, bytes] | None = None
        if keys is not None:
            held = {}
            for epoch, key in keys.items():
                if not 1 <= epoch <= U32_MAX:
                    raise ValueError(f"key epoch {epoch} out of range 1..{U32_MAX}")
                if len(key) != KEY_LEN:
                    raise ValueError(f"a stream key has {KEY_LEN} bytes, got {len(key)}")
                held[epoch] = bytes(key)
        self._streams[stream_id] = (held, session)

    def drop_stream(self, stream_id: int) -> None:
        """Refuse copies of `stream_id` from now on; what is held is still released."""
        self._streams.pop(stream_id, None)

    def datagram_received(
        self,
        endpoint: int,
        data: bytes | bytearray | memoryview,
        parent: int,
        arrival_ns: int,
        now_ns: int,
    ) -> None:
        """One copy for `endpoint` from the sender the pump calls `parent`, effective arrival
        `arrival_ns` (may lie in the future); then advance to `now_ns`."""
        if not 0 <= endpoint < self._endpoints:
            raise ValueError(f"endpoint {endpoint} out of range 0..{self._endpoints - 1}")
        if not 0 <= parent <= U32_MAX:
            raise ValueError(f"parent {parent} out of range 0..{U32_MAX}")
        counts = self._counts[endpoint]
        counts[_RECEIVED] += 1
        if len(data) > MAX_DATAGRAM:
            # Refused before it is stored, so the pending set's memory stays bounded.
            counts[_MALFORMED_LENGTH] += 1
            self._advance(now_ns)
            return
        # A copy in the caller's receive buffer may wait in the pending set: own the bytes
        # (free for bytes, which bytes() returns as is).
        data = bytes(data)
        pending = self._pending
        if arrival_ns > now_ns:
            # Advance first: copies that became due since the last call are no longer waiting
            # and do not count against the capacity; this copy is not due, so the order of
            # processing is the same.
            self._advance(now_ns)
            if len(pending) >= self._pending_capacity:
                counts[_PENDING_OVERFLOW] += 1
                return
            heapq.heappush(pending, (arrival_ns, self._receipts, endpoint, data, parent))
            self._receipts += 1
            return
        if pending and pending[0][0] <= now_ns:
            heapq.heappush(pending, (arrival_ns, self._receipts, endpoint, data, parent))
            self._receipts += 1
            self._advance(now_ns)
            return
        # Nothing else is due: process it directly rather than through the heap.
        self._process(endpoint, data, parent, arrival_ns, now_ns)
        self._release_due(now_ns)
        self._poll_naks(now_ns)

    def timer(self, now_ns: int) -> None:
        """Time passed: process due copies and release due messages."""
        self._advance(now_ns)

    def set_endpoints(self, endpoints: int) -> None:
        """A new plan gave this host `endpoints` endpoints; grow only (held ranks stay)."""
        if endpoints < self._endpoints:
            raise ValueError(f"endpoints can only grow: {self._endpoints} -> {endpoints}")
        for _ in range(endpoints - self._endpoints):
            self._counts.append([0] * len(COUNTER_NAMES))
            self._rings.append({})
            self._parents.append({})
            self._recovered.append([0, 0])
        if self._naks is not None:
            self._naks.set_endpoints(endpoints)
        self._endpoints = endpoints
        self._hold.endpoints = endpoints

    def flush(self, now_ns: int) -> None:
        """Shutdown: process every pending copy as at `now_ns`, whatever its arrival, then
        release every held message at `now_ns`, ON_TIME, in release order."""
        pending = self._pending
        while pending:
            arrival, _receipt, endpoint, data, parent = heapq.heappop(pending)
            self._process(endpoint, data, parent, arrival, now_ns)
        hold = self._hold
        while (r := hold.pop_next()) is not None:
            self._release_held(r.endpoint, r.stream_id, r.seq, r.deadline_ns, r.item, now_ns)

    # Outputs

    def releases(self) -> list[CoreRelease]:
        """Every release since the last call, in the order they happened."""
        out = self._releases
        self._releases = []
        return out

    def naks(self) -> list[CoreNak]:
        """Every NAK due since the last call, in the order they became due."""
        out = self._nak_out
        self._nak_out = []
        return out

    def get_timer(self) -> int | None:
        """The earliest of the next pending arrival, the next held deadline and the next NAK
        due, in ns; None when nothing waits."""
        deadline = self._hold.get_timer()
        if self._pending:
            arrival = self._pending[0][0]
            if deadline is None or arrival < deadline:
                deadline = arrival
        if self._naks is not None:
            due = self._naks.next_due()
            if due is not None and (deadline is None or due < deadline):
                return due
        return deadline

    def recovery_counters(self, endpoint: int) -> dict[str, int]:
        """The recovery counters of one endpoint, keyed by RECOVERY_COUNTER_NAMES (zeros when
        recovery is off)."""
        self._check_endpoint(endpoint)
        sent, coalesced, lost = self._naks.counts(endpoint) if self._naks else (0, 0, 0)
        ok, late = self._recovered[endpoint]
        return dict(zip(RECOVERY_COUNTER_NAMES, (sent, coalesced, ok, late, lost), strict=True))

    @property
    def open_gaps(self) -> int:
        """Ranges of missing sequence numbers waiting for a copy or a NAK."""
        return self._naks.open_gaps if self._naks is not None else 0

    def counters(self, endpoint: int) -> dict[str, int]:
        """The counters of one endpoint, keyed by COUNTER_NAMES (zeros included)."""
        self._check_endpoint(endpoint)
        return dict(zip(COUNTER_NAMES, self._counts[endpoint], strict=True))

    def parents(self, endpoint: int) -> dict[int, tuple[int, int]]:
        """(copies parsed, copies kept) per parent id seen by one endpoint."""
        self._check_endpoint(endpoint)
        return {p: (c[0], c[1]) for p, c in self._parents[endpoint].items()}

    @property
    def endpoints(self) -> int:
        """Endpoints as set now."""
        return self._endpoints

    @property
    def held(self) -> int:
        """Datagrams held until their deadline."""
        return len(self._hold)

    @property
    def pending(self) -> int:
        """Copies waiting for their effective arrival."""
        return len(self._pending)

    @property
    def clamped(self) -> int:
        """Held datagrams whose deadline was raised to the stream's previous one."""
        return self._hold.counters.clamped

    # Internals

    def _check_endpoint(self, endpoint: int) -> None:
        if not 0 <= endpoint < self._endpoints:
            raise ValueError(f"endpoint {endpoint} out of range 0..{self._endpoints - 1}")

    def _advance(self, now_ns: int) -> None:
        pending = self._pending
        while pending and pending[0][0] <= now_ns:
            arrival, _receipt, endpoint, data, parent = heapq.heappop(pending)
            self._process(endpoint, data, parent, arrival, now_ns)
        self._release_due(now_ns)
        self._poll_naks(now_ns)

    def _poll_naks(self, now_ns: int) -> None:
        tracker = self._naks
        if tracker is None:
            return
        due = tracker.next_due()
        if due is None or due > now_ns:
            return
        for req in tracker.poll(now_ns):
            config = self._streams.get(req.stream_id)
            keys = config[0] if config is not None else None
            key = (max(keys), keys[max(keys)]) if keys else None
            data = encode_nak(
                stream_id=req.stream_id, session=req.session, ranges=req.ranges,
                send_time_ns=now_ns, key_bytes=key,
            )  # fmt: skip
            self._nak_out.append(CoreNak(req.endpoint, req.stream_id, req.session, data))

    def _release_due(self, now_ns: int) -> None:
        hold = self._hold
        timer = hold.get_timer()
        if timer is None or timer > now_ns:
            return
        for r in hold.pop_due(now_ns):
            self._release_held(r.endpoint, r.stream_id, r.seq, r.deadline_ns, r.item, now_ns)

    def _release_held(
        self, endpoint: int, stream: int, seq: int, deadline: int, item: _Held, now_ns: int
    ) -> None:
        parent, session, count, sent, arrival, payload, held_flags = item
        counts = self._counts[endpoint]
        counts[_RELEASED] += count
        flags = self._gap_flag(counts, endpoint, stream, session, seq, count) | held_flags
        self._releases.append(
            CoreRelease(
                endpoint, parent, stream, session, seq, count, ReleaseKind.ON_TIME, deadline,
                sent, arrival, now_ns, payload, flags,
            )
        )  # fmt: skip

    def _gap_flag(
        self, counts: list[int], endpoint: int, stream: int, session: int, seq: int, count: int
    ) -> int:
        missed = self._gaps.released(endpoint, stream, session, seq, count)
        if not missed:
            return 0
        counts[_GAPS] += 1
        counts[_GAP_MESSAGES] += missed
        return MP_FLAG_GAP_BEFORE

    def _process(self, endpoint: int, data: bytes, parent: int, arrival: int, now_ns: int) -> None:
        counts = self._counts[endpoint]
        fields = _parse(data)
        if isinstance(fields, int):
            counts[_MALFORMED + fields] += 1
            return
        flags, stream, session, seq, sent, deadline, count, key_epoch = fields
        # Authenticate before anything about the copy is believed or remembered.
        config = self._streams.get(stream)
        if config is None:
            counts[_REJECT_STREAM] += 1
            return
        keys, announced = config
        if keys is not None:
            key = keys.get(key_epoch)
            if key is None:
                counts[_REJECT_KEY] += 1
                return
            # A duplicate of a copy already kept is dropped whatever its MAC says: it moves no
            # state and releases nothing, so it need not be hashed (at H=2 two copies in three).
            ring = self._rings[endpoint].get(stream)
            if (
                ring is not None
                and not flags & FLAG_HEARTBEAT
                and (announced is None or session == announced)
                and ring.seen(session, seq)
            ):
                seen = self._parents[endpoint].get(parent)
                if seen is None:
                    seen = self._parents[endpoint][parent] = [0, 0]
                seen[0] += 1
                counts[_DUPLICATES] += 1
                return
            if not hmac.compare_digest(mac_of(data, key), data[MAC_OFFSET:HEADER_LEN]):
                counts[_REJECT_MAC] += 1
                return
        if announced is not None and session != announced:
            counts[_REJECT_SESSION] += 1
            return
        seen = self._parents[endpoint].get(parent)
        if seen is None:
            seen = self._parents[endpoint][parent] = [0, 0]
        seen[0] += 1
        if flags & FLAG_HEARTBEAT:
            counts[_HEARTBEATS] += 1
            if self._naks is not None:
                self._naks.heartbeat(endpoint, stream, session, seq, now_ns)
            return
        rings = self._rings[endpoint]
        ring = rings.get(stream)
        if ring is None:
            ring = rings[stream] = DedupRing(size=self._ring_size)
        verdict = ring.check(session, seq, self._ahead)
        if verdict is not Verdict.ACCEPT:
            if verdict is Verdict.DUPLICATE:
                counts[_DUPLICATES] += 1
            elif verdict is Verdict.AHEAD:
                counts[_REJECT_AHEAD] += 1
            else:
                counts[_STALE] += 1
            return
        counts[_ACCEPTED] += 1
        seen[1] += 1
        retransmitted = flags & FLAG_RETRANSMIT
        if self._naks is not None:
            self._naks.data(
                endpoint, stream, session, seq, count, now_ns, retransmit=bool(retransmitted)
            )
        mp_flags = MP_FLAG_RECOVERED if retransmitted else 0
        payload = data[HEADER_LEN:]
        if deadline == 0:
            kind = ReleaseKind.UNSTAMPED
        elif deadline <= now_ns:
            kind = ReleaseKind.LATE
            counts[_LATE] += count
        elif self._hold.push(
            deadline_ns=deadline,
            stream_id=stream,
            seq=seq,
            endpoint=endpoint,
            item=(parent, session, count, sent, arrival, payload, mp_flags),
            clamp=not retransmitted,
        ):
            if retransmitted:
                self._recovered[endpoint][0] += count
            return
        else:
            kind = ReleaseKind.OVERFLOW
            counts[_HOLD_OVERFLOW] += 1
        if retransmitted:
            self._recovered[endpoint][kind is ReleaseKind.LATE] += count
        counts[_RELEASED] += count
        flags = self._gap_flag(counts, endpoint, stream, session, seq, count) | mp_flags
        if kind is ReleaseKind.LATE:
            flags |= MP_FLAG_LATE
        self._releases.append(
            CoreRelease(
                endpoint, parent, stream, session, seq, count, kind, deadline, sent, arrival,
                now_ns, payload, flags,
            )
        )  # fmt: skip


__all__ = ["COUNTER_NAMES", "CoreNak", "CoreRelease", "ReceiverCore", "ReleaseKind"]
