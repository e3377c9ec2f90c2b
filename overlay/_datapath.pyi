"""Type stubs of overlay._datapath: the native receive pump (native/pump.c)."""

from collections.abc import Mapping, Sequence
from typing import Any

from _typeshed import ReadableBuffer

from jasper.recovery import RecoveryConfig

RECORD_FIELDS: tuple[tuple[str, str], ...]
"""The release record as (name, numpy type) pairs: numpy.dtype(list(RECORD_FIELDS))."""
RECORD_SIZE: int
"""Bytes per release record (72)."""
RECORD_FORMAT: str
"""The release record as a struct format ("<IIIIQHBBIqqqqq")."""
RECORD_DOC: str
"""Offsets, types and meaning of the release record's fields."""
UNKNOWN_PARENT: int
"""0xFFFFFFFE: the parent id of a source missing from set_parents."""
BATCH: int
"""Datagrams per recvmmsg call (64)."""
SLOT_BYTES: int
"""Receive buffer per datagram: MAX_DATAGRAM + 1, so a longer datagram is seen as one."""
MAX_DATAGRAM: int
"""Longest valid datagram (header plus MAX_PAYLOAD)."""

Delivery = tuple[int, int, int, int, int, int, int, int, bytes, int]
"""(endpoint, stream_id, session, seq, count, kind, deadline_ns, handed_ns, payload, mp_flags):
one in-process delivery (payload: the message blocks; mp_flags: jasper.mp_spec MP_FLAG_*);
handed_ns is CLOCK_REALTIME when the pump queued it (the matching record also has the core's
release_ns on the node clock)."""

class ReceivePump:
    """The native receive pump of one receiver process (see native/pump.c).

    Sockets are dup'ed: the caller may close its own after add_endpoint / set_deliver.
    """

    def __init__(
        self,
        *,
        endpoints: int,
        ring_size: int = 4096,
        hold_capacity: int = 65536,
        pending_capacity: int = 65536,
        spin_ns: int = 20000,
        priority: int = 0,
        cpu: int = -1,
        record_capacity: int = 1 << 20,
        delivery_capacity: int = 65536,
        coalesce_ns: int = 200_000,
    ) -> None:
        """spin_ns caps the adaptive lead: the thread wakes that long before a deadline (about
        the 95th percentile of its recent oversleeps plus 5 µs) and spins the rest.
        coalesce_ns (0..10 ms, 0: off): woken by data after a sleep, wait this long before
        receiving (never past a deadline's lead point), so a burst is taken in one round; a
        pending emulated arrival is processed up to coalesce_ns after it. Arrival stamps stay the
        kernel's; unstamped copies are released up to coalesce_ns later."""
    def add_endpoint(self, index: int, fd: int, out_fd: int = -1, out_addr: bytes = b"") -> None:
        """Receive endpoint `index` on UDP socket `fd`; index == endpoints grows by one."""
    def set_deliver(self, index: int, out_fd: int, out_addr: bytes = b"") -> None:
        """Deliver endpoint `index` by sendto(out_fd, out_addr), or in process (out_fd -1), or
        stamp and count only (out_fd -2: in process with no reader)."""
    def set_parents(self, parents: list[tuple[str, int, int]], /) -> None:
        """[(ip, port, parent_id)]; port 0 matches any port of ip."""
    def set_streams(
        self, streams: list[tuple[int, Mapping[int, ReadableBuffer] | None, int | None]], /
    ) -> None:
        """[(stream_id, keys, session)] of a plan: the streams the core admits. keys: {key
        epoch: 32-byte key} (at most 4; the MAC is checked) or None (unauthenticated); session:
        the announced publisher session, or None (follow the newest). Streams of the last call
        not named again are dropped; copies of streams never set are refused ("stream")."""
    def set_link_model(
        self,
        model: None = None,
        /,
        *,
        median_ns: int | None = None,
        p99_ns: int | None = None,
        spike_prob: float | None = None,
        spike_min_ns: int | None = None,
        spike_max_ns: int | None = None,
        loss: float | None = None,
        seed: int | None = None,
        factors: dict[tuple[int, int], float] | None = None,
    ) -> None:
        """Off with no median_ns; else LinkSampler's distribution per (parent, endpoint)."""
    def set_path_model(
        self,
        model: None = None,
        /,
        *,
        publisher: int | None = None,
        nodes: list[tuple[int, int, float]] | None = None,
        edges: list[tuple[int, int]] | list[tuple[int, int, float | None]] | None = None,
        endpoints: list[tuple[int, int, float]] | None = None,
    ) -> None:
        """Emulate every hop of the plan (docs/link-model.md, "The fast path and the link
        model"); off with None (the last hop only, as set_link_model).

        nodes: (parent id, key, factor) for the publisher and every relay: ids from
        set_parents' table, keys global (overlay.nativepath.node_key: the same on every host),
        factor the lemon factor of links touching the node (1.0: none). edges: (src_id,
        dst_id[, loss]) for every sender -> relay link (own parent and hedges; loss overrides
        the model's on that link). endpoints: (index, key, factor) of this host's endpoints.
        The link model's parameters (set_link_model) apply; with it off nothing is emulated.
        A copy from a parent outside the graph gets the last-hop model.
        """
    def path_arrival(
        self,
        parent_id: int,
        endpoint: int,
        stream: int,
        session: int,
        seq: int,
        send_ns: int,
        heartbeat: bool = False,
        /,
    ) -> int | None:
        """Emulated arrival (kernel clock, before the floor at the real receive time) of the
        copy `parent_id` sends `endpoint` of that datagram; None when it is lost on the way.
        heartbeat: of a heartbeat naming `seq` sent at `send_ns` (drawn apart from the
        message's own copy)."""
    def path_forward(
        self, node_id: int, stream: int, session: int, seq: int, send_ns: int, /
    ) -> int | None:
        """E(node): the emulated time the node forwards the datagram; None if it never does."""
    def set_recovery(
        self, config: RecoveryConfig | None, naks: Sequence[tuple[int, str, int]], /
    ) -> None:
        """Loss recovery (docs/recovery.md): the core's NAK schedule (None: off, open ranges
        forgotten) and [(stream_id, ip, port)] where each stream's NAKs go, sent from the
        endpoint's own socket; NAKs of a stream not listed are counted, not sent."""
    def set_clock_offset(self, offset_ns: int, /) -> None:
        """The node clock minus CLOCK_REALTIME, in ns."""
    def start(self) -> None: ...
    def stop(self, *, drain: bool = True, timeout_s: float = 5.0) -> int:
        """Stop; with drain release held entries on time until timeout_s, then flush the rest.
        Returns how many the final flush released early."""
    def close(self) -> None: ...
    def counters(self) -> dict[str, Any]:
        """Totals and per-endpoint counters.

        Totals: recv_calls, datagrams, batches (recvmmsg calls that returned datagrams),
        link_lost, link_overflow (copies drawn from the shared generator: link table full),
        records_dropped, deliveries_dropped, truncated, wakeups (sleeps that ended), warmups
        (send-path warm-ups, at most one per deadline), held, pending, clamped, flushed
        (released early by the final flush of stop), records_waiting, deliveries_waiting,
        rounds (receive rounds), rounds_cut (rounds stopped at a deadline), coalesced (rounds
        deferred by coalesce_ns), spins (deadlines spun toward), spin_ns (time spent spinning),
        late_wakes (wake-ups toward a deadline later than the lead), lead_ns (the current
        lead), path_copies (copies given a whole-path arrival), path_floored (of which the
        emulated arrival was before the real one: floored), path_memo_hits, path_memo_misses,
        path_too_deep (a sender chain deeper than 64: a cycle), naks_sent, naks_unaddressed
        (NAKs of a stream set_recovery named no port for), nak_errors (sendto failed),
        open_gaps (ranges the NAK schedule holds) (ints); realtime (SCHED_FIFO
        in force), pinned (bools); sched_error, pin_error (errno names, "" when none).

        "endpoints": a list, per endpoint a dict: the core's counters (received, heartbeats,
        accepted, duplicates, stale, released, late, hold_overflow, pending_overflow,
        nomem, malformed_<reason> and rejected_<reason> for every reason), kernel_drops (the
        socket's cumulative SO_RXQ_OVFL count), truncated (longer than SLOT_BYTES; also
        malformed_length), link_lost, delivered, recv_errors, the recovery counters
        (naks_sent, naks_coalesced, recovered, recovered_late, unrecoverable: the core's,
        jasper.recovery.RECOVERY_COUNTER_NAMES), nak_errors, deliver_errors ({errno name: n};
        "ENOBUFS": in-process queue full; "other" past 8 names) and parents ({parent id:
        (copies, kept)}, as jc_parents).
        """
    def take_records(self) -> bytes: ...
    def take_deliveries(self) -> list[Delivery]: ...
    @property
    def notify_fd(self) -> int: ...
    @property
    def held(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def endpoints(self) -> int: ...
    @property
    def running(self) -> bool: ...
