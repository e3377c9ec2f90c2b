"""Publisher: the exchange's side; stamps session, sequence, send time and deadline, and sends."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import socket
import stat
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from jasper.deadline import DeadlineStamper
from jasper.recovery import RetransmitBuffer
from jasper.topology import Topology
from jasper.wire import (
    Header,
    StreamKey,
    WireError,
    decode_nak,
    encode,
    encode_batch,
    mac_matches,
    unpack_blocks,
)
from jasper.wire_spec import BLOCK_HEADER_LEN, FLAG_HEARTBEAT, MAX_MESSAGE, MAX_PAYLOAD
from overlay.common import process_figures
from overlay.kernel import SO_RXQ_OVFL
from overlay.recordlog import RecordLog, sent_log

_OVFL_SPACE = socket.CMSG_SPACE(4)
"""Ancillary space for SO_RXQ_OVFL's u32 drop count."""


class Publisher:
    """Sends each message once to each of the publisher's targets (normally the root relay).

    With `batch_ns` > 0 the messages due within that window go out together, packed into
    datagrams up to the MTU (`publish_batch`); 0 sends each message in a datagram of its own.

    deadline = send time + the hold in force (`set_hold_ns`, the whole gap from send to release);
    send time comes from `clock` (the node's clock, ns since the epoch). Deadlines never go
    backwards within the stream: when the hold shrinks faster than time passes, they are
    clamped to the previous one (`DeadlineStamper`).
    """

    def __init__(
        self,
        topo: Topology,
        *,
        clock: Callable[[], int] = time.time_ns,
        session: int | None = None,
        hold_ns: int | None = None,
        records: RecordLog | None = None,
        batch_ns: int = 0,
        retransmit_capacity: int = 65536,
        tail_heartbeat_ns: int = 1_000_000,
    ) -> None:
        self.topo = topo
        self.clock = clock
        # The session this process sends under; the controller announces it to the tree from
        # the publisher's status (docs/security.md), unless the topology fixes one.
        if session is None:
            session = topo.stream.session
        self.session = session if session is not None else int(time.time()) & 0xFFFFFFFF
        self.key: StreamKey | None = None
        """The stream key datagrams are signed with (None: an unauthenticated lab stream)."""
        self.hold_ns = topo.stream.hold_ns if hold_ns is None else hold_ns
        self.stream_id = topo.stream.id
        self.plan_epoch = topo.plan_epoch
        self.seq = 0
        self.stamper = DeadlineStamper()
        self.records = records if records is not None else sent_log()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        # NAKs come in bursts (every endpoint under a lost copy asks within ~200 us) while the
        # loop is busy publishing: at the default 208 KB a quarter of them were dropped here
        # (10,000 msg/s, 100 endpoints, 10% loss). The kernel counts what it still drops.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        self.naks_dropped = 0
        """NAKs the kernel dropped for a full receive buffer (SO_RXQ_OVFL, cumulative)."""
        # With a port in the plan the publisher serves NAKs there (docs/recovery.md), and sends
        # from it too, so receivers' source filters know the retransmissions' sender.
        self.sock.bind((topo.publisher.addr, topo.publisher.port or 0))
        self.retransmit: RetransmitBuffer | None = (
            RetransmitBuffer(capacity=retransmit_capacity)
            if topo.publisher.port is not None
            else None
        )
        """The last datagrams sent, for NAKs (None: the plan names no publisher port)."""
        self.nak_refused: Counter[str] = Counter()
        """NAKs refused, by jasper.wire_spec.NAK_REASONS."""
        self.tail_heartbeat_ns = tail_heartbeat_ns
        """After this long without data, one heartbeat tells receivers the newest seq, so a
        lost last message is NAKed before its deadline (0: never)."""
        self.heartbeats = 0
        self._last_data_mono = 0
        self._tail_sent = True
        self._next_tail_ns = 0
        self._recovery_task: asyncio.Task[None] | None = None
        self._endpoint_addrs: frozenset[tuple[str, int]] = frozenset()
        self.targets: list[tuple[str, int]] = []
        self.started_ns = time.time_ns()
        self.sent = 0
        self.datagrams = 0
        """Data datagrams formed (each sent once per target)."""
        if batch_ns < 0:
            raise ValueError(f"batch window must be >= 0 ns, got {batch_ns}")
        self.batch_ns = batch_ns
        self.send_errors: Counter[str] = Counter()
        self.ingress = IngressCounters()
        self.apply_topology(topo)

    def set_hold_ns(self, ns: int) -> None:
        """Hold in force for the next messages (deadline = send time + hold)."""
        if ns < 0:
            raise ValueError(f"hold must be >= 0 ns, got {ns}")
        self.hold_ns = ns

    def apply_topology(self, topo: Topology) -> None:
        """Send to the new plan's targets from the next message on."""
        addrs = topo.addresses()
        self.targets = [addrs[t.node] for t in topo.publisher.targets]
        self.plan_epoch = topo.plan_epoch
        self.topo = topo
        # A NAK is served only to an endpoint of the plan: its source is where the
        # retransmission goes, and nothing else may be sent data by asking.
        self._endpoint_addrs = frozenset((h.addr, e.port) for h, e in topo.endpoints())
        # A rotation reaches the publisher as a new sign_epoch once every node holds the key.
        auth = topo.stream.auth
        self.key = auth.signing_key() if auth is not None else None

    def publish(self, payload: bytes) -> Header:
        """Stamp and send one message in a datagram of its own; returns its header."""
        return self.publish_batch([payload])[0]

    def publish_batch(self, payloads: list[bytes]) -> list[Header]:
        """Stamp and send messages packed into as few datagrams as fit the MTU, in order;
        returns one header per datagram. Every message of a datagram shares its send time and
        deadline: the datagram is what travels, so its copies reach every endpoint together."""
        headers: list[Header] = []
        start = 0
        while start < len(payloads):
            size = BLOCK_HEADER_LEN + len(payloads[start])
            end = start + 1
            while end < len(payloads):
                size += BLOCK_HEADER_LEN + len(payloads[end])
                if size > MAX_PAYLOAD:
                    break
                end += 1
            headers.append(self._send_batch(payloads[start:end]))
            start = end
        return headers

    def _send_batch(self, payloads: list[bytes]) -> Header:
        first = self.seq + 1
        now = self.clock()
        h = Header(
            stream_id=self.stream_id,
            session=self.session,
            seq=first,
            send_time_ns=now,
            deadline_ns=self.stamper.stamp(
                stream_id=self.stream_id, send_ns=now, hold_ns=self.hold_ns
            ),
            plan_epoch=self.plan_epoch,
        )
        data = encode_batch(h, payloads, key=self.key)  # ValueError before the seq moves
        self.seq += len(payloads)
        self._send(data)
        self.datagrams += 1
        if self.retransmit is not None:
            self.retransmit.add(self.session, first, len(payloads), data)
            self._last_data_mono = time.monotonic_ns()
            self._tail_sent = False
        append = self.records.append
        for i in range(len(payloads)):
            append((h.stream_id, h.session, first + i, h.send_time_ns, h.deadline_ns))
        return h

    def heartbeat(self) -> None:
        """A keep-alive carrying the send time (and the last sequence number)."""
        now = self.clock()
        h = Header(
            stream_id=self.stream_id,
            session=self.session,
            seq=self.seq,
            send_time_ns=now,
            deadline_ns=0,
            plan_epoch=self.plan_epoch,
            flags=FLAG_HEARTBEAT,
        )
        self._send(encode(h, key=self.key))
        self.heartbeats += 1

    # -- loss recovery (docs/recovery.md) -------------------------------------------------

    def start_recovery(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Serve NAKs on the publisher's socket and send tail heartbeats (when the plan names
        a publisher port); idempotent."""
        if self.retransmit is None or self._recovery_task is not None:
            return
        loop = loop or asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self.serve_naks)
        self._recovery_task = loop.create_task(self._tail_heartbeats())

    def stop_recovery(self) -> None:
        task, self._recovery_task = self._recovery_task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())

    async def linger(self, seconds: float) -> None:
        """Keep serving NAKs for `seconds` after the last message (its loss is NAKed within
        about one hold), then stop."""
        if self.retransmit is None:
            return
        self.start_recovery()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.stop_recovery()

    async def _tail_heartbeats(self) -> None:
        # While idle, heartbeats at 1, 2, 4, ... tail intervals (up to 64): a lost heartbeat
        # must not hide a lost last message for long, and an idle stream costs little.
        gap = self.tail_heartbeat_ns
        if gap <= 0:
            return
        wait = gap
        while True:
            await asyncio.sleep(gap / 1e9)
            if self._tail_sent:
                idle = time.monotonic_ns() - self._last_data_mono
                if idle >= self._next_tail_ns:
                    self.heartbeat()
                    self._next_tail_ns = idle + min(wait := wait * 2, 64 * gap)
                continue
            if time.monotonic_ns() - self._last_data_mono >= gap:
                self._tail_sent = True
                wait = gap
                self._next_tail_ns = 2 * gap
                self.heartbeat()

    def serve_naks(self) -> None:
        """Answer the NAKs queued on the socket (a bounded number per call)."""
        buf = self.retransmit
        if buf is None:
            return
        refused = self.nak_refused
        auth = self.topo.stream.auth
        keys = auth.by_epoch() if auth is not None else None
        for _ in range(256):
            try:
                data, anc, _flags, src = self.sock.recvmsg(2048, _OVFL_SPACE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.send_errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
                return
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(value) >= 4:
                    self.naks_dropped = int.from_bytes(value[:4], sys.byteorder)
            try:
                nak = decode_nak(data)
            except WireError:
                refused["malformed"] += 1
                continue
            if nak.stream_id != self.stream_id:
                refused["stream"] += 1
                continue
            if keys is not None and (reason := mac_matches(data, keys)) is not None:
                refused[reason] += 1
                continue
            if nak.session != self.session:
                refused["session"] += 1
                continue
            if src not in self._endpoint_addrs:
                refused["source"] += 1
                continue
            for out in buf.serve(nak, src, time.monotonic_ns(), self.key):
                try:
                    self.sock.sendto(out, src)
                except OSError as exc:
                    self.send_errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1

    def recovery_status(self) -> dict[str, Any] | None:
        """The publisher's recovery counters (None: recovery off)."""
        if self.retransmit is None:
            return None
        out: dict[str, Any] = dict(self.retransmit.counts)
        out["naks_refused"] = dict(self.nak_refused)
        out["buffered"] = len(self.retransmit)
        out["naks_dropped"] = self.naks_dropped
        out["heartbeats"] = self.heartbeats
        return out

    def _send(self, data: bytes) -> None:
        for addr in self.targets:
            try:
                self.sock.sendto(data, addr)
                self.sent += 1
            except OSError as exc:
                self.send_errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1

    async def run(
        self,
        *,
        rate: float,
        duration_s: float | None,
        payloads: Callable[[int], bytes] | None = None,
        stop: asyncio.Event | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Publish at `rate` msg/s for `duration_s` (None = until `stop`); returns messages sent.

        Sends follow an absolute schedule, so a late wake-up sends what is due at once and the
        average rate holds even though asyncio sleeps only to ~1 ms.
        """
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        make = payloads or OrderBook().update
        self.start_recovery()
        period_ns = int(1e9 / rate)
        start = time.monotonic_ns()
        end = None if duration_s is None else start + int(duration_s * 1e9)
        n = 0
        next_progress = 0
        while stop is None or not stop.is_set():
            now = time.monotonic_ns()
            due = (now - start) // period_ns + 1
            if end is not None:
                due = min(due, (end - start) // period_ns)
            if n < due and self.batch_ns > 0:
                # Everything due since the last wake-up (at most one window) shares datagrams.
                self.publish_batch([make(i) for i in range(n + 1, due + 1)])
                n = due
            while n < due:
                n += 1
                self.publish(make(n))
            if end is not None and n >= (end - start) // period_ns:
                break
            if progress is not None and now >= next_progress:
                progress(n)
                next_progress = now + 200_000_000
            # With batching, the first message due waits out one window for others to join it.
            wait_ns = start + n * period_ns - time.monotonic_ns() + self.batch_ns
            if wait_ns > 0:
                if stop is None:
                    await asyncio.sleep(wait_ns / 1e9)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait_ns / 1e9)
        if progress is not None:
            progress(n)
        return n

    async def run_ingress(
        self,
        sock: socket.socket,
        *,
        duration_s: float | None = None,
        stop: asyncio.Event | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Publish what the matching engine sends to `sock` (INGRESS framing: each datagram is
        one or more blocks of a u16 length and the message) until `stop` or `duration_s`;
        returns messages published.

        Messages that arrive together go out together: with batch_ns = 0, everything read in
        one wake-up shares datagrams; with batch_ns > 0, a message waits at most that long for
        others to join it. A malformed ingress datagram is counted and dropped whole.
        """
        loop = asyncio.get_running_loop()
        stop = stop or asyncio.Event()
        sock.setblocking(False)
        self.start_recovery(loop)
        pending: list[bytes] = []
        flush_at: asyncio.TimerHandle | None = None
        published = 0

        def flush() -> None:
            nonlocal flush_at, published
            if flush_at is not None:
                flush_at.cancel()
                flush_at = None
            if pending:
                self.publish_batch(pending)
                published += len(pending)
                pending.clear()

        def on_readable() -> None:
            nonlocal flush_at
            c = self.ingress
            for _ in range(256):  # bounded: the loop must get back to its other work
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    c.errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
                    break
                c.datagrams += 1
                try:
                    messages = unpack_blocks(data)
                except WireError:
                    c.malformed += 1
                    continue
                if not messages:
                    c.malformed += 1
                    continue
                if any(len(m) > MAX_MESSAGE for m in messages):
                    c.oversize += 1
                    continue
                c.messages += len(messages)
                pending.extend(messages)
            if not pending:
                return
            if self.batch_ns <= 0:
                flush()
            elif flush_at is None:
                flush_at = loop.call_later(self.batch_ns / 1e9, flush)

        loop.add_reader(sock.fileno(), on_readable)
        try:
            end = None if duration_s is None else time.monotonic() + duration_s
            while not stop.is_set():
                left = 0.2 if end is None else min(0.2, end - time.monotonic())
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), left)
                if progress is not None:
                    progress(published + len(pending))
        finally:
            loop.remove_reader(sock.fileno())
            on_readable()  # what already arrived is published, not lost
            flush()
        if progress is not None:
            progress(published)
        return published

    def status(self) -> dict[str, Any]:
        return {
            "kind": "publisher",
            "ingress": self.ingress.to_dict(),
            "session": self.session,
            "stream_id": self.stream_id,
            "seq": self.seq,
            "messages": self.seq,
            "datagrams": self.datagrams,
            "batch_ns": self.batch_ns,
            "sent_datagrams": self.sent,
            "send_errors": dict(self.send_errors),
            "hold_ns": self.hold_ns,
            "deadlines_clamped": self.stamper.clamped,
            "plan_epoch": self.plan_epoch,
            "recovery": self.recovery_status(),
            "process": process_figures(self.started_ns),
        }

    def close(self) -> None:
        self.stop_recovery()
        self.sock.close()


class IngressCounters:
    """What the publisher's ingress socket took from the matching engine."""

    __slots__ = ("datagrams", "errors", "malformed", "messages", "oversize")

    def __init__(self) -> None:
        self.datagrams = 0
        """Datagrams read."""
        self.messages = 0
        """Messages taken (and published)."""
        self.malformed = 0
        """Datagrams dropped: blocks that do not fill the datagram exactly, or none at all."""
        self.oversize = 0
        """Datagrams dropped: a message longer than one Jasper datagram can carry."""
        self.errors: Counter[str] = Counter()
        """Receive errors by errno name."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "datagrams": self.datagrams,
            "messages": self.messages,
            "malformed": self.malformed,
            "oversize": self.oversize,
            "errors": dict(self.errors),
        }


def parse_source(text: str) -> tuple[str, Any]:
    """`--source`: ("synthetic", None), ("udp", (host, port)) or ("unix", path); ValueError
    says what is wrong."""
    if text == "synthetic":
        return "synthetic", None
    if text.startswith("udp:"):
        host, sep, port = text[4:].rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"{text!r}: expected udp:HOST:PORT with a port 0-65535")
        return "udp", (host or "127.0.0.1", int(port))
    if text.startswith("unix:") and len(text) > 5:
        return "unix", text[5:]
    raise ValueError(f"{text!r}: expected synthetic, udp:HOST:PORT or unix:PATH")


def open_ingress(text: str) -> socket.socket | None:
    """The bound ingress socket of `--source` (None for synthetic). A unix path left by an
    earlier run is replaced; OSError when the address cannot be bound."""
    kind, addr = parse_source(text)
    if kind == "synthetic":
        return None
    if kind == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(addr).st_mode):
                os.unlink(addr)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


_UPDATE = struct.Struct("!IBqqI")  # instrument, side, price (1e-4), quantity, level


class OrderBook:
    """Synthetic order-book updates: a random walk of prices over a few instruments."""

    def __init__(self, *, instruments: int = 16, seed: int = 7) -> None:
        self._rng = random.Random(seed)
        self._mid = [1_000_000 + 10_000 * i for i in range(instruments)]

    def update(self, seq: int) -> bytes:
        rng = self._rng
        i = rng.randrange(len(self._mid))
        self._mid[i] += rng.choice((-100, 0, 100))
        side = rng.randrange(2)
        level = rng.randrange(10)
        price = self._mid[i] + (level + 1) * (100 if side else -100)
        qty = rng.randrange(1, 1000)
        return _UPDATE.pack(i, side, price, qty, level) + seq.to_bytes(8, "big")


def session_after(announced: int | None, now_s: float) -> int:
    """A publisher session for a new process: from the wall clock (seconds, as a u32), and
    later than the announced one, so a process restarted within the same second never reuses
    its predecessor's session (the tree would drop its copies as duplicates)."""
    session = int(now_s) & 0xFFFFFFFF
    if announced is not None and session <= announced:
        session = (announced + 1) & 0xFFFFFFFF
    return session


def batch_ns_of(args: Any) -> int:
    """The publisher's batch window in ns for `--batch-us` (0 when not given)."""
    return round(float(getattr(args, "batch_us", 0.0) or 0.0) * 1000)


def registered_port(args: Any, addr: str) -> int:
    """The UDP port a publisher under the controller registers for `--port`: it sends from it
    and serves NAKs there once the plan names it (docs/recovery.md); 0 picks a free one."""
    port = int(getattr(args, "port", 0) or 0)
    if port:
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((addr, 0))
        free: int = s.getsockname()[1]
    return free
