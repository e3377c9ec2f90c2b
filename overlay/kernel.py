"""Thin Linux bindings the daemons need: timestamped UDP sockets, timerfd, timer slack, and
the CPU wake-up latency request."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import struct
import time
from collections.abc import Callable

# Not exported by Python 3.11's socket module (values from asm-generic/socket.h, x86 and arm).
SO_TIMESTAMPNS = 35
SO_RXQ_OVFL = 40
PR_SET_TIMERSLACK = 29
CLOCK_REALTIME = 0
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1

_TIMESPEC = struct.Struct("@qq")
_U32 = struct.Struct("@I")
ANCILLARY_BYTES = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(_U32.size)
RECV_BYTES = 2048

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_timerfd_settime = _libc.timerfd_settime
_timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_timerfd_settime.restype = ctypes.c_int


def set_timer_slack(ns: int = 1) -> bool:
    """Set the calling thread's timer slack (default 50 µs) so sleeps end on time."""
    return int(_libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0)) == 0


CPU_DMA_LATENCY = "/dev/cpu_dma_latency"


class CpuWakeupLatency:
    """A PM QoS request that idle CPUs wake within `latency_us`, held until `close()`.

    Why: on a VM an idle vCPU halts, leaves the host's CPU, and a timer that fires for it waits
    until the host runs it again; a release thread sleeping to a deadline then wakes late by
    whatever the host is doing (measured here: release tails of milliseconds on an idle guest,
    none under load). With a request of 0 the idle loop polls instead of halting, so the vCPU
    stays on its host CPU. The cost is that idle vCPUs burn their host CPU while it is held: a
    setting for a receiver host whose job is to release on time, not a default for every node.
    The kernel keeps the lowest request of all open ones and drops ours when the file closes.
    """

    def __init__(self, latency_us: int, *, path: str = CPU_DMA_LATENCY) -> None:
        if latency_us < 0:
            raise ValueError(f"CPU wake-up latency must be >= 0 µs, got {latency_us}")
        self.latency_us = latency_us
        self.path = path
        self._fd: int | None = None
        self.error: str | None = None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.error = f"{path}: {exc.strerror or exc}"
            return
        try:
            os.write(fd, struct.pack("=i", latency_us))
        except OSError as exc:
            os.close(fd)
            self.error = f"{path}: {exc.strerror or exc}"
            return
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_udp(
    addr: str, port: int, *, timestamps: bool = True, rcvbuf: int = 4 << 20, sndbuf: int = 4 << 20
) -> socket.socket:
    """A non-blocking UDP socket bound to (addr, port) with kernel receive timestamps."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        if timestamps:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            # The kernel reports its count of datagrams dropped for a full receive buffer.
            sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        sock.bind((addr, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


Datagram = tuple[bytes, tuple[str, int], int]
"""(payload bytes, source address, kernel receive time in ns since the epoch)."""


def drain(
    sock: socket.socket,
    handle: Callable[[bytes, tuple[str, int], int], None],
    *,
    limit: int = 256,
    now: Callable[[], int] = time.time_ns,
) -> tuple[int, int]:
    """Receive up to `limit` datagrams already queued on `sock`, handing each to `handle`.

    Returns (datagrams received, the kernel's cumulative drop count or -1 when not reported).
    The bound keeps one busy socket from starving the others sharing the loop.
    """
    got = 0
    drops = -1
    recvmsg = sock.recvmsg
    errors = 0
    while got < limit:
        try:
            data, anc, _flags, src = recvmsg(RECV_BYTES, ANCILLARY_BYTES)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            # ICMP errors queued on the socket (e.g. port unreachable) surface once each; a
            # persistent error (a closed socket) must not spin here.
            errors += 1
            if errors > 8:
                break
            continue
        ts = 0
        for level, kind, body in anc:
            if level == socket.SOL_SOCKET:
                if kind == SO_TIMESTAMPNS and len(body) >= _TIMESPEC.size:
                    sec, nsec = _TIMESPEC.unpack_from(body)
                    ts = sec * 1_000_000_000 + nsec
                elif kind == SO_RXQ_OVFL and len(body) >= _U32.size:
                    drops = _U32.unpack_from(body)[0]
        handle(data, src, ts or now())
        got += 1
    return got, drops


class TimerFd:
    """A CLOCK_REALTIME timerfd: an absolute-time timer with ns resolution for the event loop.

    asyncio rounds its own timers up to a millisecond (epoll's timeout unit); a timerfd in the
    selector wakes the loop within microseconds instead.
    """

    def __init__(self) -> None:
        fd = int(_libc.timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK | TFD_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd
        self.armed_ns: int | None = None
        """The absolute expiry in force (ns since the epoch), None when disarmed."""
        # One preallocated struct: arming happens per delayed copy, so keep it cheap.
        self._spec = _Itimerspec()
        self._value = self._spec.it_value
        self._ref = ctypes.addressof(self._spec)

    def fileno(self) -> int:
        return self.fd

    def arm(self, at_ns: int) -> None:
        """Fire at the absolute time `at_ns` (ns since the epoch); re-arming replaces it."""
        if self.armed_ns == at_ns:
            return
        at_ns = max(at_ns, 1)
        value = self._value
        value.tv_sec, value.tv_nsec = divmod(at_ns, 1_000_000_000)
        if _timerfd_settime(self.fd, TFD_TIMER_ABSTIME, self._ref, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.armed_ns = at_ns

    def disarm(self) -> None:
        if self.armed_ns is None:
            return
        spec = _Itimerspec()
        _timerfd_settime(self.fd, 0, ctypes.addressof(spec), None)
        self.armed_ns = None

    def consume(self) -> None:
        """Read the expiry count so the fd stops being readable."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.read(self.fd, 8)
        self.armed_ns = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
