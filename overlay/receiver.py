"""Receiver daemon: many MP endpoints per process; dedup, hold until the deadline, deliver."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from jasper.dedup import DedupRing
from jasper.deliver import parse_target
from jasper.mp_spec import (
    MP_FLAG_GAP_BEFORE,
    MP_FLAG_LATE,
    MP_FLAG_RECOVERED,
    GapTracker,
    MpMessage,
)
from jasper.mp_spec import frame as mp_frame
from jasper.owd import OwdCollector
from jasper.recovery import NakTracker, RecoveryConfig
from jasper.schedule import Release
from jasper.topology import EndpointConfig, Topology, stream_rules
from jasper.wire import HEADER_LEN, WireError, encode_nak, mac_matches, unpack_blocks
from jasper.wire_spec import FLAG_HEARTBEAT, FLAG_RETRANSMIT
from overlay.audit_log import ReleaseAuditor
from overlay.common import CopyCounters, link_model_of, process_figures
from overlay.delayline import DelayLine, SenderNames
from overlay.fastwire import peek
from overlay.kernel import CpuWakeupLatency, drain, open_udp
from overlay.nativepath import NativeDatapath, ReleaseLog, native_available
from overlay.recordlog import RecordLog, ReleaseRecords
from overlay.release import DEFAULT_SPIN_NS, REALTIME_PRIORITY, PreciseRelease
from overlay.releasec import ReleaseQueue, release_queue, sockaddr

log = logging.getLogger(__name__)

DATAPATHS = ("python", "native", "auto")
"""Receive paths: the Python reference, the native C thread, or native where it is built."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One released datagram handed to an MP (what the async iterator yields): its batch of
    messages, all with the same deadline."""

    endpoint: str
    """Endpoint name."""
    stream_id: int
    """Stream of the message."""
    session: int
    """Publisher session."""
    seq: int
    """Sequence number of the first message; message i has seq + i."""
    deadline_ns: int
    """Release time stamped by the root (ns since the epoch)."""
    release_ns: int
    """When it was handed over (true time, ns since the epoch)."""
    late: bool
    """True when it arrived after its deadline and was delivered at once."""
    payload: bytes
    """The message blocks as on the wire (each a u16 length and the bytes); see `messages`."""
    flags: int = 0
    """MP flags (jasper.mp_spec): MP_FLAG_LATE, MP_FLAG_GAP_BEFORE (before the first message),
    as a socket delivery's headers carry them."""

    @property
    def messages(self) -> list[bytes]:
        """The market-data messages, in sequence order."""
        return unpack_blocks(self.payload)

    @property
    def mp_messages(self) -> list[MpMessage]:
        """The messages as a socket delivery carries them (docs/mp-feed.md): each with its
        seq, the flags (gap-before on the first only) and the times."""
        return [
            MpMessage(
                self.stream_id,
                self.session,
                self.seq + i,
                self.flags if i == 0 else self.flags & ~MP_FLAG_GAP_BEFORE,
                self.release_ns,
                self.deadline_ns,
                m,
            )
            for i, m in enumerate(unpack_blocks(self.payload))
        ]


@dataclass
class EndpointCounters(CopyCounters):
    """What one endpoint saw and did."""

    delivered: int = 0
    """Messages handed to the MP (on time or late)."""
    late: int = 0
    """Messages that arrived after their deadline and were delivered at once."""
    hold_overflow: int = 0
    """Messages refused by a full release schedule, delivered at once instead."""
    deliver_dropped: Counter[str] = field(default_factory=Counter)
    """Deliveries the MP could not take: its queue full, or the socket refusing (by errno)."""
    gaps: int = 0
    """Deliveries flagged gap-before: a sequence number skipped at this endpoint."""
    gap_messages: int = 0
    """Sequence numbers so skipped (one may still come later, out of order)."""
    naks_sent: int = 0
    """NAK datagrams sent to the publisher (jasper.recovery.RECOVERY_COUNTER_NAMES)."""
    naks_coalesced: int = 0
    """Ranges asked for in a NAK beside its first one."""
    recovered: int = 0
    """Messages a retransmission brought before their deadline (released on time)."""
    recovered_late: int = 0
    """Messages a retransmission brought after their deadline (released late, recovered)."""
    unrecoverable: int = 0
    """Missing messages given up (NAKs spent, hole too wide, new session)."""

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["distinct_parents"] = len(self.copies_from)
        return out


class LagStats:
    """Receive-path lag (processing time − effective arrival) of accepted copies, in ns."""

    __slots__ = ("count", "max_ns", "over_1ms", "total_ns")

    def __init__(self) -> None:
        self.count = 0
        self.total_ns = 0
        self.max_ns = 0
        self.over_1ms = 0

    def observe(self, lag_ns: int) -> None:
        self.count += 1
        self.total_ns += lag_ns
        if lag_ns > self.max_ns:
            self.max_ns = lag_ns
        if lag_ns > 1_000_000:
            self.over_1ms += 1

    def to_dict(self) -> dict[str, float]:
        mean = self.total_ns / self.count if self.count else 0.0
        return {"count": self.count, "mean_ns": mean, "max_ns": self.max_ns,
                "over_1ms": self.over_1ms}  # fmt: skip


_Held = tuple[int, int, int, int, bytes, int, str, int, int]
"""What waits in the release schedule: stream, session, first seq, deadline ns, payload (the
message blocks), arrival ns, parent kept, message count, MP flags known when held
(MP_FLAG_RECOVERED or 0)."""


class Endpoint:
    """One MP endpoint: its socket, dedup rings, delivery target and counters."""

    def __init__(
        self, config: EndpointConfig, index: int, addr: str, *, ring_size: int, queue_len: int
    ) -> None:
        self.name = config.name
        self.index = index
        self.config = config
        self.stream_id: int | None = None
        """The stream whose plan names this endpoint (None: any the host takes, as in a lab
        topology's single stream); copies of other streams are refused here."""
        self.sock = open_udp(addr, config.port)
        self.counters = EndpointCounters()
        self.rings: dict[int, DedupRing] = {}
        self.ring_size = ring_size
        self.queue: collections.deque[Delivery] = collections.deque()
        self.queue_len = queue_len
        self.consumer: asyncio.Event | None = None
        self.handle: Callable[[bytes, tuple[str, int], int], None] = lambda d, s, t: None
        """What the event loop calls per datagram (set by the receiver)."""
        self._out: socket.socket | None = None
        self._out_addr: Any = None
        self.out_fd = -1
        """File descriptor of the delivery socket (-1 when delivering in process)."""
        self.out_sockaddr = b""
        """The delivery address as a struct sockaddr, for the C release path."""
        try:
            self.set_deliver(config.deliver)
        except BaseException:
            self.sock.close()
            raise

    def set_deliver(self, target: str | None) -> None:
        """Open the delivery socket for "udp:ADDR:PORT" or "unix:/path"; None = in-process.
        A malformed target is a ValueError and leaves the current one in place."""
        parsed = parse_target(target) if target is not None else None
        if self._out is not None:
            self._out.close()
            self._out = None
        if parsed is None:
            self._out_addr = None
        elif parsed.kind == "udp":
            self._out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._out_addr = (parsed.addr, parsed.port)
        else:
            self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._out_addr = parsed.path
        if self._out is not None:
            self._out.setblocking(False)
            self.out_fd = self._out.fileno()
            self.out_sockaddr = sockaddr(self._out.family, self._out_addr)
        else:
            self.out_fd = -1
            self.out_sockaddr = b""

    def hand_over(self, payload: bytes) -> bool:
        """Give one delivery datagram to the MP; False (and counted) when it cannot take it."""
        out = self._out
        if out is not None:
            try:
                out.sendto(payload, self._out_addr)
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                self.counters.deliver_dropped[name] += 1
                return False
            return True
        return True

    def close(self) -> None:
        self.sock.close()
        if self._out is not None:
            self._out.close()


class Receiver:
    """A receiver process: hosts the endpoints of one receiver host of a topology.

    Receive path (event loop): socket -> link model -> decode -> per-endpoint dedup -> hold.
    Release path (a C thread without the GIL, else a Python thread): sleep to ~spin_ns before
    the deadline, spin, hand over.

    `deliver`: "topology" (each endpoint's target), None (in process), a target for every
    endpoint ("udp:HOST:PORT", "unix:/path") or "sink" (every endpoint sends to one loopback
    socket this receiver opens and never reads).
    """

    def __init__(
        self,
        topo: Topology,
        host: str,
        *,
        link_model: bool = True,
        clock: Callable[[], int] = time.time_ns,
        synced: Callable[[], bool] = lambda: True,
        ring_size: int = 4096,
        hold_capacity: int = 65536,
        queue_len: int = 4096,
        spin_ns: int = DEFAULT_SPIN_NS,
        realtime: bool = True,
        deliver: str | None = "topology",
        records: RecordLog | None = None,
        c_release: bool = True,
        reading_then: Callable[[int], int] | None = None,
        owd: OwdCollector | None = None,
        auditor: ReleaseAuditor | None = None,
        cpu_wakeup_us: int | None = None,
        release_threads: int = 1,
        datapath: str = "python",
        recovery: RecoveryConfig | None = None,
    ) -> None:
        if datapath not in DATAPATHS:
            raise ValueError(f"datapath must be one of {', '.join(DATAPATHS)}, got {datapath!r}")
        self.topo = topo
        """The plan applied last (of any stream): its link model is the host's."""
        self.plans: dict[int, Topology] = {topo.stream.id: topo}
        """Stream id -> the plan this host runs for it (a host may hold endpoints of several
        streams)."""
        self.host = topo.receiver(host)
        self.streams = stream_rules(topo)
        """Stream id -> (keys by epoch or None, announced session or None): what the Python
        path admits (the native path gets the same from apply_plan)."""
        self.clock = clock
        self.synced = synced
        self.started_ns = time.time_ns()
        self._use_link_model = link_model
        self.delay = DelayLine(link_model_of(topo) if link_model else None, clock=clock)
        self.senders = SenderNames(topo)
        self._record_rows: RecordLog | ReleaseRecords = (
            records
            if records is not None
            else ReleaseRecords(lambda: [ep.name for ep in self.endpoints])
        )
        """Where the Python path books releases: one row per datagram and endpoint (or per
        message, into a DELIVERY_DTYPE RecordLog passed as `records`)."""
        self.records: RecordLog | ReleaseRecords | ReleaseLog = self._record_rows
        self.endpoints: list[Endpoint] = []
        self.by_name: dict[str, Endpoint] = {}
        self.sink: socket.socket | None = None
        """The unread loopback socket every endpoint delivers to with deliver="sink"."""
        if deliver == "sink":
            # Real sends into a socket nobody reads (the kernel drops what its small buffer
            # cannot take): an MP's delivery cost, through the C release path, without MPs.
            self.sink = open_udp("127.0.0.1", 0, timestamps=False, rcvbuf=4096)
            deliver = f"udp:127.0.0.1:{self.sink.getsockname()[1]}"
        self._deliver_override = deliver
        self._ring_size = ring_size
        self._queue_len = queue_len
        self.reading_then: Callable[[int], int] = reading_then or (lambda true_ns: true_ns)
        """Kernel time -> what the node clock read then (arrival stamps are kernel times)."""
        self._clock_arithmetic = reading_then is not None or clock is time.time_ns
        """True when `reading_then` is the node clock's own offset from the kernel clock."""
        self.owd = owd
        """One-way delays of accepted copies on the node clock, for heartbeats (None: off)."""
        self.auditor = auditor
        """Release audit log (None: off)."""
        self._c_release = c_release
        self._realtime = realtime
        self._spin_ns = spin_ns
        self._hold_capacity = hold_capacity
        if cpu_wakeup_us is not None and cpu_wakeup_us < 0:
            raise ValueError(f"cpu_wakeup_us must be >= 0, got {cpu_wakeup_us}")
        self._cpu_wakeup_us = cpu_wakeup_us
        self.cpu_wakeup: CpuWakeupLatency | None = None
        """The PM QoS request held while running (None: not asked for)."""
        if release_threads < 1:
            raise ValueError(f"release_threads must be >= 1, got {release_threads}")
        self._release_threads = release_threads
        self._queues: list[ReleaseQueue] = []
        """The C release threads, endpoint i on thread i mod n (empty: not started, or not
        available here; then the Python release thread serves every endpoint). They send
        socket deliveries and time-stamp in-process ones without the GIL. Several threads send
        one deadline's batch in parallel, so the last endpoint waits behind fewer sends."""
        self._notify_fd = -1
        self._inflight: dict[int, tuple[Endpoint, _Held, bool]] = {}
        """What the C thread holds or sent but the loop has not booked yet, by token."""
        self._next_token = 0
        self._gaps = GapTracker()
        """Gap-before in release order where Python releases (the C threads track their own)."""
        self._gap_lock = threading.Lock()
        self.naks: NakTracker | None = None
        """Loss recovery on the Python path (docs/recovery.md); None: the plan names no
        publisher port (the native path keeps its own in its core)."""
        self._nak_addrs = _nak_addrs(self.plans)
        """Stream id -> where its NAKs go (the stream's publisher port)."""
        self._nak_timer: asyncio.TimerHandle | None = None
        self._nak_timer_at = 0
        self._recovery = recovery or recovery_config(host)
        """When to NAK (a seed of this host's own unless given)."""
        if self._nak_addrs:
            self.naks = NakTracker(self._recovery, endpoints=1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.native: NativeDatapath | None = None
        """The native data path (a C thread per receiver) when it runs; None: the Python one."""
        if datapath != "python":
            ok, why = native_available()
            if ok:
                self.native = NativeDatapath(
                    self,
                    ring_size=ring_size,
                    hold_capacity=hold_capacity,
                    spin_ns=spin_ns,
                    realtime=realtime,
                    clock_offset=self._clock_offset,
                )
                self._c_release = False  # the native path releases itself
            elif datapath == "native":
                raise RuntimeError(f"native data path unavailable: {why}")
            else:
                log.warning("native data path unavailable (%s): the Python path runs", why)
        self.datapath = "python" if self.native is None else "native"
        if self.native is not None:
            self.naks = None  # the native core keeps its own NAK schedule
        model = self.delay.model
        if self.native is None and model is not None and model.emulated_at == "receivers":
            log.warning(
                "the plan emulates links at the receivers, which needs the native path: this "
                "Python receiver applies the model to its last hop only (relays do not delay)"
            )
        if self.native is not None and records is None:
            self.records = ReleaseLog(self.native)
        self.plan_refused: dict[str, str] = {}
        """Endpoints of the plan left out or kept on their old target, with the reason."""
        try:
            for cfg in self.host.endpoints:
                try:
                    self._add_endpoint(cfg, topo.stream.id)
                except ValueError as exc:  # a malformed deliver target: this endpoint only
                    log.error("endpoint %s of plan %d left out: %s", cfg.name, topo.plan_epoch, exc)
                    self.plan_refused[cfg.name] = str(exc)
        except BaseException:
            for ep in self.endpoints:
                ep.close()
            raise
        self.release: PreciseRelease[_Held] = PreciseRelease(
            endpoints=max(1, len(self.endpoints)),
            deliver=self._release_batch,
            capacity=hold_capacity,
            clock=clock,
            spin_ns=spin_ns,
            name=f"release-{host}",
            realtime=realtime,
        )
        self.lag = LagStats()
        self._booking: collections.deque[tuple[Endpoint, _Held, int, bool, int]] = (
            collections.deque()
        )
        self._book_scheduled = False
        self.fast_path_mode = "user"
        self.fast_path: Any = None

    def _add_endpoint(self, cfg: EndpointConfig, stream: int) -> Endpoint:
        """Open one endpoint of `stream`'s plan and start receiving on it (if running)."""
        ep = Endpoint(
            cfg,
            len(self.endpoints),
            self.host.addr,
            ring_size=self._ring_size,
            queue_len=self._queue_len,
        )
        ep.stream_id = stream
        try:
            if self._deliver_override != "topology":
                ep.set_deliver(self._deliver_override)
        except BaseException:
            ep.close()
            raise
        ep.handle = self._handler(ep)
        self.endpoints.append(ep)
        self.by_name[ep.name] = ep
        if self.naks is not None:
            self.naks.set_endpoints(len(self.endpoints))
        if self.native is not None:
            self.native.add_endpoint(ep)
            return ep
        self._start_queue()
        release = getattr(self, "release", None)
        if release is not None:
            # The index is in range before any copy for it can be held: copies arrive on this
            # (the loop) thread, after this returns.
            release.schedule.endpoints = max(1, len(self.endpoints))
        if self._loop is not None and not self._loop.is_closed():
            self._loop.add_reader(ep.sock.fileno(), self._on_readable, ep)
        return ep

    def _start_queue(self) -> None:
        """Start the C release threads, once, with the first endpoint."""
        if not self._c_release or self._queues:
            return
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        queues: list[ReleaseQueue] = []
        cpus = sorted(os.sched_getaffinity(0))
        for i in range(self._release_threads):
            queue = release_queue(
                capacity=self._hold_capacity,
                spin_ns=self._spin_ns,
                priority=REALTIME_PRIORITY if self._realtime else 0,
                notify_fd=fd,  # shared: one wake-up books what every thread sent
                cpu=cpus[i % len(cpus)] if self._release_threads > 1 else -1,
            )
            if queue is None:
                break
            queues.append(queue)
        if len(queues) < self._release_threads:
            for queue in queues:
                queue.stop(drain=False)
                queue.close()
            os.close(fd)
            self._c_release = False
            log.info("C release thread unavailable: releases use the Python thread")
            return
        self._queues, self._notify_fd = queues, fd
        if self._loop is not None and not self._loop.is_closed():
            self._loop.add_reader(fd, self._on_released)

    # -- lifecycle ----------------------------------------------------------------------------

    def _clock_offset(self) -> int:
        """Node clock minus kernel clock, now (the native path stamps on the kernel clock)."""
        kernel_ns = time.time_ns()
        if self._clock_arithmetic:
            return self.reading_then(kernel_ns) - kernel_ns
        return self.clock() - kernel_ns

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = loop or asyncio.get_running_loop()
        self._loop = loop
        if self._cpu_wakeup_us is not None and self.cpu_wakeup is None:
            self.cpu_wakeup = CpuWakeupLatency(self._cpu_wakeup_us)
            if self.cpu_wakeup.held:
                log.info("idle CPUs asked to wake within %d µs", self._cpu_wakeup_us)
            else:
                log.warning("CPU wake-up latency not set: %s", self.cpu_wakeup.error)
        if self.native is not None:
            self._apply_native()
            self.native.start(loop)
            return
        self.delay.start(loop)
        self.release.start()
        if self._queues:
            loop.add_reader(self._notify_fd, self._on_released)
        for ep in self.endpoints:
            loop.add_reader(ep.sock.fileno(), self._on_readable, ep)

    def stop(self) -> None:
        """Stop receiving, process copies the link model still holds, release what is held."""
        if self.native is not None:
            self.native.stop(timeout_s=self._longest_hold_ns() / 1e9 + 1.0)
            return
        if self._loop is not None:
            for ep in self.endpoints:
                self._loop.remove_reader(ep.sock.fileno())
                # Take everything the kernel already queued (a busy host can be far behind).
                while True:
                    got, _ = drain(ep.sock, ep.handle)
                    ep.counters.received += got
                    if not got:
                        break
        self.delay.flush()
        # Held messages are released on time, so wait up to one hold for the last of them.
        wait_s = self._longest_hold_ns() / 1e9 + 1.0
        self.release.stop(drain=True, timeout=wait_s)
        if self._queues:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._notify_fd)
            for queue in self._queues:
                queue.stop(drain=True, timeout_s=wait_s)
            self._on_released()
            # Cannot happen after a drain; said if so.
            for ep, _held, _late in self._inflight.values():
                ep.counters.deliver_dropped["shutdown"] += 1
            self._inflight.clear()
        self._book()

    def close(self) -> None:
        if self._nak_timer is not None:
            self._nak_timer.cancel()
            self._nak_timer = None
        if self.native is not None:
            self.native.close()
        self.delay.close()
        if self.cpu_wakeup is not None:
            self.cpu_wakeup.close()
        if self._queues:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._notify_fd)
            for queue in self._queues:
                queue.close()
            os.close(self._notify_fd)
            self._queues, self._notify_fd = [], -1
        for ep in self.endpoints:
            ep.close()
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        if self.auditor is not None:
            try:
                self.auditor.close()
            except OSError:
                log.exception("closing the audit log")
            self.auditor = None
        if self.fast_path is not None:
            try:
                self.fast_path.close()
            except Exception:
                log.exception("closing fast path")
            self.fast_path = None

    def _kernel_counters(self) -> dict[str, int]:
        """The eBPF filter's counters (its BPF map, summed over CPUs); {} without it."""
        if self.fast_path is None:
            return {}
        try:
            return dict(self.fast_path.counters())
        except Exception:  # a map that cannot be read must not fail the status
            log.exception("reading the receiver fast path's counters failed")
            return {}

    def held(self) -> int:
        """Messages held for release on either path (the C threads' count includes those sent
        but not yet booked by the loop)."""
        if self.native is not None:
            return self.native.held
        return len(self.release.schedule) + len(self._inflight)

    def _on_readable(self, ep: Endpoint) -> None:
        got, drops = drain(ep.sock, ep.handle)
        ep.counters.received += got
        if drops >= 0:
            ep.counters.kernel_drops = drops

    def _handler(self, ep: Endpoint) -> Callable[[bytes, tuple[str, int], int], None]:
        admit = self.delay.admit
        name = ep.name

        def process(data: bytes, sender: str, arrival_ns: int) -> None:
            self.process(ep, data, sender, arrival_ns)

        def handle(data: bytes, src: tuple[str, int], rx_ns: int) -> None:
            admit(name, self.senders(src), data, rx_ns, process)

        return handle

    # -- the receive path ---------------------------------------------------------------------

    def process(self, ep: Endpoint, data: bytes, sender: str, arrival_ns: int) -> None:
        """Handle one copy for `ep` at its (effective) arrival time."""
        c = ep.counters
        try:
            flags, stream, session, _epoch, seq, _sent, deadline, count = peek(data)
        except WireError as exc:
            c.malformed[exc.reason] += 1
            return
        # Authenticate before anything about the copy is believed (jasper.receiver_core's
        # order: stream, key, MAC, session).
        rules = self.streams.get(stream)
        if rules is None or (ep.stream_id is not None and stream != ep.stream_id):
            c.rejected["stream"] += 1
            return
        if rules[0] is not None and (reason := mac_matches(data, rules[0])) is not None:
            c.rejected[reason] += 1
            return
        if rules[1] is not None and session != rules[1]:
            c.rejected["session"] += 1
            return
        c.copies_from[sender] += 1
        naks = self.naks
        if flags & FLAG_HEARTBEAT:
            c.heartbeats += 1
            if naks is not None:
                naks.heartbeat(ep.index, stream, session, seq, self.clock())
                self._arm_naks()
            return
        if not c.admit(ep.rings, ep.ring_size, stream, session, seq):
            return
        c.kept_from[sender] += 1
        retransmitted = flags & FLAG_RETRANSMIT
        held: _Held = (
            stream, session, seq, deadline, data[HEADER_LEN:], arrival_ns, sender, count,
            MP_FLAG_RECOVERED if retransmitted else 0,
        )  # fmt: skip
        now = self.clock()
        if naks is not None:
            naks.data(ep.index, stream, session, seq, count, now, retransmit=bool(retransmitted))
            if naks.open_gaps:
                self._arm_naks()
        if retransmitted:
            if deadline != 0 and deadline <= now:
                c.recovered_late += count
            else:
                c.recovered += count
        # A retransmission's delay is the NAK's round trip, not the path's: no OWD sample.
        if self.owd is not None and not retransmitted:
            self.owd.record(
                endpoint=ep.index,
                stream_id=stream,
                send_ns=_sent,
                arrival_ns=self.reading_then(arrival_ns),
                deadline_ns=deadline,
                now_ns=now,
            )
        # How far the receive path runs behind the (effective) arrivals it processes.
        lag = now - arrival_ns
        self.lag.observe(lag)
        if deadline == 0 or deadline <= now:
            self._deliver_now(ep, held, late=deadline != 0)
            return
        if self._queues:
            if self._hold_in_c(ep, held, now):
                return
        elif self.release.hold(
            deadline_ns=deadline, stream_id=stream, seq=seq, endpoint=ep.index, item=held,
            clamp=not retransmitted,
        ):  # fmt: skip
            return
        c.hold_overflow += 1
        # Not through the C threads, which are full; gap-before of such a delivery is then
        # tracked apart from theirs (an overflow is already a fault to be counted).
        self._deliver_now(ep, held, late=False, via_queue=False)

    # -- loss recovery (docs/recovery.md) ------------------------------------------------------

    def _arm_naks(self) -> None:
        """Wake the loop when the earliest open range wants its NAK."""
        naks, loop = self.naks, self._loop
        if naks is None or loop is None or loop.is_closed():
            return
        due = naks.next_due()
        if due is None:
            return
        if self._nak_timer is not None:
            if self._nak_timer_at <= due:
                return
            self._nak_timer.cancel()
        self._nak_timer_at = due
        self._nak_timer = loop.call_later(max(0, due - self.clock()) / 1e9, self._poll_naks)

    def _poll_naks(self) -> None:
        self._nak_timer = None
        naks, addrs = self.naks, self._nak_addrs
        if naks is None or not addrs:
            return
        # Take what the kernel already queued first: on a receive path running behind, the
        # copies that close a hole (or a retransmission) may be waiting there, and a NAK (or a
        # range given up) for them would be a false one.
        for ep in self.endpoints:
            self._on_readable(ep)
        if self.delay.model is not None:
            self.delay.run_due()
        now = self.clock()
        for req in naks.poll(now):
            keys = self.streams.get(req.stream_id, (None, None))[0]
            key = (max(keys), keys[max(keys)]) if keys else None
            data = encode_nak(
                stream_id=req.stream_id, session=req.session, ranges=req.ranges,
                send_time_ns=now, key_bytes=key,
            )  # fmt: skip
            ep = self.endpoints[req.endpoint]
            addr = addrs.get(req.stream_id)
            if addr is None:  # a stream whose plan names no publisher port (or is gone)
                continue
            try:  # from the endpoint's socket: the retransmission comes back to it
                ep.sock.sendto(data, addr)
            except OSError as exc:
                ep.counters.deliver_dropped[f"nak_{errno.errorcode.get(exc.errno or 0, '?')}"] += 1
        self._arm_naks()

    def _recovery_counts(self, ep: Endpoint) -> None:
        if self.naks is not None and ep.index < len(self.endpoints):
            sent, coalesced, lost = self.naks.counts(ep.index)
            ep.counters.naks_sent, ep.counters.naks_coalesced = sent, coalesced
            ep.counters.unrecoverable = lost

    def _hold_in_c(
        self, ep: Endpoint, held: _Held, now: int, *, at_once: bool = False, late: bool = False
    ) -> bool:
        """Queue one delivery on the C release thread (in process: its time stamp); False when
        it is full. `at_once`: first in line (deadline 0); `late`: flagged late."""
        queues = self._queues
        stream, session, seq, deadline, _payload, _arrival, _parent, count, held_flags = held
        if at_once:
            deadline, rank = 0, 0
        else:
            deadline, rank = self.release.schedule.order(
                deadline_ns=deadline, stream_id=stream, seq=seq, endpoint=ep.index,
                clamp=not held_flags & MP_FLAG_RECOVERED,
            )  # fmt: skip
        token = self._next_token
        self._next_token += 1
        # The C thread waits on the kernel clock; the node clock may be offset from it. The
        # offset comes from the clock's arithmetic where known, not from two readings, which
        # differ per copy by the time between them (the C thread's batch window absorbs that).
        kernel_ns = time.time_ns()
        node_ns = self.reading_then(kernel_ns) if self._clock_arithmetic else now
        framed = b""
        if ep.out_fd >= 0:  # the C thread writes the release time and gap-before
            framed = self._framed(held, MP_FLAG_LATE if late else 0, 0)  # + held flags
        rc = queues[ep.index % len(queues)].push(
            deadline_ns=deadline - (node_ns - kernel_ns) if deadline else 0,
            stream_id=stream,
            seq=seq,
            rank=rank,
            token=token,
            fd=ep.out_fd,  # -1 in process: stamped, not sent
            addr=ep.out_sockaddr,
            payload=framed,
            mp_endpoint=ep.index,
            session=session,
            count=count,
            clock_offset_ns=node_ns - kernel_ns,
        )
        if rc != 0:
            return False
        self._inflight[token] = (ep, held, late)
        return True

    @staticmethod
    def _framed(held: _Held, flags: int, release_ns: int) -> bytes:
        stream, session, seq, deadline, payload, _arrival, _parent, count, held_flags = held
        return mp_frame(
            payload, stream_id=stream, session=session, seq=seq, count=count,
            flags=flags | held_flags,
            release_ns=release_ns, deadline_ns=deadline,
        )  # fmt: skip

    def _gap_flag(self, ep: Endpoint, held: _Held) -> int:
        """Book a Python release with the gap tracker: MP_FLAG_GAP_BEFORE or 0."""
        stream, session, seq, _deadline, _payload, _arrival, _parent, count, _f = held
        with self._gap_lock:
            missed = self._gaps.released(ep.index, stream, session, seq, count)
            if not missed:
                return 0
            ep.counters.gaps += 1
            ep.counters.gap_messages += missed
        return MP_FLAG_GAP_BEFORE

    def _on_released(self) -> None:
        """Book what the C release thread sent (woken through its eventfd)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._notify_fd)
        inflight = self._inflight
        for queue in self._queues:
            for token, stamp, err, gap in queue.take_mp():
                ep, held, late = inflight.pop(token)
                if err:
                    ep.counters.deliver_dropped[errno.errorcode.get(err, str(err))] += 1
                flags = (MP_FLAG_LATE if late else 0) | held[8]
                if gap:
                    ep.counters.gaps += 1
                    ep.counters.gap_messages += gap
                    flags |= MP_FLAG_GAP_BEFORE
                self._after(ep, held, stamp, late, err == 0, flags)

    def _deliver_now(
        self, ep: Endpoint, held: _Held, *, late: bool, via_queue: bool = True
    ) -> None:
        if late:
            ep.counters.late += held[7]
        # With C release threads, a late one goes out through them too (deadline 0, first in
        # line), so gap-before is tracked in one place, in release order.
        queued = via_queue and self._queues
        if queued and self._hold_in_c(ep, held, self.clock(), at_once=True, late=late):
            return
        flags = self._gap_flag(ep, held) | (MP_FLAG_LATE if late else 0) | held[8]
        ok = ep.hand_over(self._framed(held, flags, self.clock())) if ep.out_fd >= 0 else True
        release_ns = time.time_ns()
        self._after(ep, held, release_ns, late, ok, flags)

    def _release_batch(self, batch: Sequence[Release[_Held]]) -> None:
        # Hand every endpoint its message first, bookkeeping after, so the last endpoint of
        # the batch does not wait behind the others' records.
        eps = self.endpoints
        done: list[tuple[Endpoint, _Held, int, bool, int]] = []
        append = done.append
        now = time.time_ns
        for r in batch:
            ep = eps[r.endpoint]
            flags = self._gap_flag(ep, r.item) | r.item[8]
            if ep.out_fd < 0:  # in process: the hand-over is the time stamp itself
                append((ep, r.item, now(), True, flags))
            else:
                ok = ep.hand_over(self._framed(r.item, flags, self.clock()))
                append((ep, r.item, now(), ok, flags))
        self._book_later(done)

    def _book_later(self, done: list[tuple[Endpoint, _Held, int, bool, int]]) -> None:
        """Leave records and counters to the event loop.

        The release thread runs at a higher real-time priority than the loops of this host's
        other receivers; bookkeeping there would make their deadlines wait for it.
        """
        self._booking.extend(done)
        loop = self._loop
        if loop is None or loop.is_closed():
            self._book()
            return
        if not self._book_scheduled:
            self._book_scheduled = True
            try:
                loop.call_soon_threadsafe(self._book)
            except RuntimeError:  # the loop closed meanwhile
                self._book()

    def _book(self) -> None:
        self._book_scheduled = False
        booking = self._booking
        while booking:
            ep, held, release_ns, ok, flags = booking.popleft()
            self._after(ep, held, release_ns, False, ok, flags)

    def _after(
        self, ep: Endpoint, held: _Held, release_ns: int, late: bool, ok: bool, flags: int = 0
    ) -> None:
        stream, session, seq, deadline, payload, arrival_ns, parent, count, _f = held
        if ok:
            ep.counters.delivered += count
        if self.auditor is not None:
            self.auditor.on_release(
                endpoint=ep.index,
                stream_id=stream,
                seq=seq,
                deadline_ns=deadline,
                release_true_ns=release_ns,
                late=late,
            )
        synced = self.synced()
        rows = self._record_rows
        if isinstance(rows, ReleaseRecords):  # one record stands for the batch's messages
            rows.add(
                endpoint=ep.index,
                parent=parent,
                stream_id=stream,
                session=session,
                seq=seq,
                count=count,
                arrival_ns=arrival_ns,
                release_ns=release_ns,
                deadline_ns=deadline,
                synced=synced,
            )
        else:
            name, append = ep.name, rows.append
            for s in range(seq, seq + count):
                append((name, stream, session, s, arrival_ns, release_ns, deadline, parent, synced))
        if ep.consumer is not None and ok:
            if len(ep.queue) >= ep.queue_len:
                ep.counters.deliver_dropped["queue_full"] += 1
                return
            ep.queue.append(
                Delivery(
                    endpoint=ep.name,
                    stream_id=stream,
                    session=session,
                    seq=seq,
                    deadline_ns=deadline,
                    release_ns=release_ns,
                    late=late,
                    payload=payload,
                    flags=flags,
                )
            )
            if self._loop is not None:
                self._loop.call_soon_threadsafe(ep.consumer.set)

    async def messages(self, endpoint: str) -> AsyncIterator[Delivery]:
        """Released messages of one endpoint, as an async iterator (for Python MPs). On the native
        data path only endpoints delivered in process (no socket target) are iterated."""
        ep = self.by_name[endpoint]
        event = ep.consumer = asyncio.Event()
        if self.native is not None:
            self.native.set_deliver(ep)  # queue its releases from now on
        try:
            while True:
                while ep.queue:
                    yield ep.queue.popleft()
                event.clear()
                if ep.queue:
                    continue
                await event.wait()
        finally:
            ep.consumer = None
            if self.native is not None:
                self.native.set_deliver(ep)

    # -- control ------------------------------------------------------------------------------

    def enable_fast_path(self, mode: str, *, ifname: str | None = None) -> str:
        """Try in-kernel dedup and source filtering per `mode`; returns the mode used.

        ifname: where to attach; None: the interface holding the host's address."""
        if mode == "user":
            return "user"
        reason = ""
        if self.delay.model is not None:
            reason = "the link model runs in user space"
        else:
            try:
                from ebpf import loader

                ok, why = loader.fast_path_available()
                if not ok:
                    reason = str(why)
                else:
                    fp = loader.ReceiverFastPath(
                        node=self.host.name,
                        ifname=ifname or loader.interface_of(self.host.addr),
                        ports=[ep.config.port for ep in self.endpoints],
                    )
                    fp.attach()
                    fp.set_parents(self._parent_rows())
                    self.fast_path = fp
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                self.fast_path = None
        if reason:
            if mode == "ebpf":
                raise RuntimeError(f"eBPF fast path unavailable: {reason}")
            log.warning("eBPF fast path unavailable (%s); filtering in user space", reason)
            return "user"
        self.fast_path_mode = "ebpf"
        return "ebpf"

    def _parent_rows(self) -> list[tuple[str, int]]:
        rows: set[tuple[str, int]] = set()
        for topo in self.plans.values():
            addrs = topo.addresses()
            rows.update(
                addrs[p]
                for ep in self.endpoints
                if ep.stream_id in (None, topo.stream.id)
                for p in ep.config.parents
                if p in addrs
            )
        # Retransmissions come straight from each stream's publisher port (docs/recovery.md).
        rows.update(self._nak_addrs.values())
        return sorted(rows)

    def apply_topology(self, topo: Topology) -> None:
        """Take a (new) plan of `topo`'s stream: endpoints keep their sockets, dedup state and
        held messages, and the host's other streams are not touched."""
        stream = topo.stream.id
        self.topo = topo
        self.plans = {**self.plans, stream: topo}
        self._nak_addrs = _nak_addrs(self.plans)
        if self._nak_addrs and self.naks is None and self.native is None:
            self.naks = NakTracker(self._recovery, endpoints=1)
            self.naks.set_endpoints(len(self.endpoints))
        self._streams_changed()
        if self._use_link_model:
            self.delay.set_model(link_model_of(topo))
        try:
            host = topo.receiver(self.host.name)
        except KeyError:
            return
        self.host = host
        # One bad entry (a port in use, a malformed deliver target) never blocks the rest of
        # the plan, nor later plans: it is logged, reported in the status and left out.
        refused: dict[str, str] = {}
        for cfg in host.endpoints:
            ep = self.by_name.get(cfg.name)
            if ep is None:
                try:
                    self._add_endpoint(cfg, stream)
                except (OSError, ValueError) as exc:
                    refused[cfg.name] = str(exc)
                continue
            if ep.stream_id not in (None, stream):
                if ep.stream_id in self.plans:
                    refused[cfg.name] = (
                        f"endpoint of stream {ep.stream_id}, named by stream {stream} too"
                    )
                    continue
                # Its stream was removed: the endpoint (socket, rings) serves this one now.
                ep.stream_id = stream
            if self._deliver_override == "topology" and cfg.deliver != ep.config.deliver:
                try:
                    ep.set_deliver(cfg.deliver)
                except (OSError, ValueError) as exc:
                    # The endpoint keeps receiving and delivering where it did.
                    refused[cfg.name] = str(exc)
                    cfg = replace(cfg, deliver=ep.config.deliver)
                else:
                    if self.native is not None:
                        self.native.set_deliver(ep)
                    elif ep.out_fd >= 0:
                        self._start_queue()
            ep.config = cfg
        for name, reason in refused.items():
            if self.plan_refused.get(name) != reason:
                log.error("endpoint %s of plan %d left out: %s", name, topo.plan_epoch, reason)
        # Refusals of the other streams' plans stand until those plans change.
        this_plan = {cfg.name for cfg in host.endpoints}
        kept = {n: r for n, r in self.plan_refused.items() if n not in this_plan}
        self.plan_refused = {**kept, **refused}
        self._plans_changed()

    def remove_stream(self, stream: int) -> None:
        """Stop serving `stream` (no plan names it any more): its copies are refused from now
        on. Its endpoints keep their sockets, idle, and what they hold is still released; the
        host's other streams keep everything."""
        if stream not in self.plans:
            return
        self.plans = {s: t for s, t in self.plans.items() if s != stream}
        if self.plans:
            self.topo = next(reversed(self.plans.values()))
        # else the last plan stays in `topo` for its link model and host; nothing is admitted.
        self._nak_addrs = _nak_addrs(self.plans)
        self._streams_changed()
        self._plans_changed()
        log.info(
            "receiver %s no longer serves stream %d (still %s)",
            self.host.name,
            stream,
            sorted(self.plans) or "none",
        )

    def _streams_changed(self) -> None:
        """Admission rules and sender names from the plans of every stream served."""
        rules: dict[int, tuple[Any, Any]] = {}
        for topo in self.plans.values():
            rules.update(stream_rules(topo))
        self.streams = rules
        if self.plans:
            self.senders = SenderNames(*self.plans.values())

    def _plans_changed(self) -> None:
        """Hand the streams now served to the native core and the kernel filter."""
        if self.native is not None:
            self._apply_native()
        if self.fast_path is not None:
            # Endpoints this plan added are filtered too, not only those of the first plan.
            self.fast_path.set_ports([ep.config.port for ep in self.endpoints])
            self.fast_path.set_parents(self._parent_rows())

    def _apply_native(self) -> None:
        assert self.native is not None
        others = [t for t in self.plans.values() if t is not self.topo]
        # The streams admitted are those served (`topo` may be a removed stream's last plan).
        self.native.apply_plan(self.topo, self.delay.model, also=others, streams=self.streams)

    def _longest_hold_ns(self) -> int:
        return max(t.stream.hold_ns for t in (self.topo, *self.plans.values()))

    def owd_reports(self) -> list[dict[str, Any]]:
        """Delay windows closed since the last call, max-reduced per stream (heartbeat form)."""
        if self.owd is None:
            return []
        return [r.as_dict() for r in self.owd.drain(self.clock())]

    def status(self) -> dict[str, Any]:
        wakeup = (
            self.cpu_wakeup.latency_us
            if self.cpu_wakeup is not None and self.cpu_wakeup.held
            else None
        )
        if self.native is not None:
            native = self.native.status()
            return {
                "kind": "receiver",
                "host": self.host.name,
                "datapath": "native",
                "refused_endpoints": len(self.plan_refused),
                "refused": dict(self.plan_refused),
                "endpoints": self.native.endpoint_status(),
                "plan_epoch": self.topo.plan_epoch,
                "streams": {str(s): t.plan_epoch for s, t in sorted(self.plans.items())},
                "fast_path": self.fast_path_mode,
                "kernel": self._kernel_counters(),
                "link_model": self.delay.model is not None,
                "cpu_wakeup_us": wakeup,
                "native": native,
                "delay_line": {"lost": native["link_lost"], "overflow": native["link_overflow"]},
                "release": {"held": self.held(), "realtime": native["realtime"]},
                "records": len(self.records),
                "process": process_figures(self.started_ns),
            }
        for ep in self.endpoints:
            self._recovery_counts(ep)
        return {
            "kind": "receiver",
            "host": self.host.name,
            "datapath": "python",
            "refused_endpoints": len(self.plan_refused),
            "refused": dict(self.plan_refused),
            "endpoints": {ep.name: ep.counters.to_dict() for ep in self.endpoints},
            "plan_epoch": self.topo.plan_epoch,
            "streams": {str(s): t.plan_epoch for s, t in sorted(self.plans.items())},
            "fast_path": self.fast_path_mode,
            "kernel": self._kernel_counters(),
            "link_model": self.delay.model is not None,
            "cpu_wakeup_us": wakeup,
            "delay_line": vars(self.delay.counters).copy(),
            "release": {
                "batches": self.release.batches,
                "errors": self.release.errors,
                "held": self.held(),
                "realtime": self.release.realtime_ok,
                "c_release": bool(self._queues),
                "c_threads": len(self._queues),
                "c_sent_per_thread": [q.counters()["sent"] for q in self._queues],
                **vars(self.release.schedule.counters),
                "c_queue": _summed([q.counters() for q in self._queues]) if self._queues else None,
                # (realtime there: how many of the threads run SCHED_FIFO)
            },
            "records": len(self.records),
            "receive_lag": self.lag.to_dict(),
            "process": process_figures(self.started_ns),
        }


def _nak_addrs(plans: dict[int, Topology]) -> dict[int, tuple[str, int]]:
    """Stream id -> its publisher's NAK address, for the streams whose plan names one."""
    return {
        stream: topo.publisher.nak_addr
        for stream, topo in plans.items()
        if topo.publisher.nak_addr is not None
    }


def recovery_config(host: str) -> RecoveryConfig:
    """The NAK schedule of a receiver host: the defaults, with a jitter seed of its own (from
    its name, so hosts that miss the same message draw different delays)."""
    digest = hashlib.sha256(host.encode()).digest()
    return RecoveryConfig(seed=int.from_bytes(digest[:8], "big"))


def _summed(counters: list[dict[str, int]]) -> dict[str, int]:
    """Counters of several release threads added up, key by key."""
    return {key: sum(c[key] for c in counters) for key in counters[0]}


def deliver_of(args: Any) -> str | None:
    """The receiver's `deliver` for `--deliver` (topology, memory or sink)."""
    choice = getattr(args, "deliver", "topology") or "topology"
    return None if choice == "memory" else choice


def audit_log_of(args: Any, topo: Topology, node_clock: Any = None) -> ReleaseAuditor | None:
    """The release audit log `--audit-log PATH` asks for ({node} in PATH: the node name);
    times and bounds on `node_clock` (an overlay.clocks clock; None: the kernel clock)."""
    path = getattr(args, "audit_log", None)
    if not path:
        return None
    from overlay.audit_log import AuditLogWriter
    from overlay.clocks import SystemClock

    name = str(args.node_name)
    try:
        endpoints = [e.name for e in topo.receiver(name).endpoints]
    except KeyError:
        endpoints = []
    clock = node_clock if node_clock is not None else SystemClock()
    writer = AuditLogWriter(
        str(path).replace("{node}", name),
        node=name,
        endpoints=endpoints,
        clock_source=type(clock).__name__,
    )
    return ReleaseAuditor(writer, clock)
