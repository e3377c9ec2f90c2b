"""Release without the GIL: a C thread that holds datagrams and sends each at its deadline.

An entry without a socket (fd -1: an endpoint delivered in process) is only time-stamped at its
deadline; the event loop hands it over when it books the stamp, as it does for the Python
release thread, whose hand-over in process is its time stamp too.

A Python release thread needs the GIL before every deadline, and the receive loop (or a
garbage collection) may hold it then. Datagrams for MPs behind a socket go instead to a queue
owned by a C thread: it sleeps to just before the earliest deadline, spins to it and sends the
batch, then reports a send time per datagram for the event loop to book. The routine
(native/release_queue.c) is compiled by the package build, like the rest of the native code,
and loaded here through ctypes; when it is not built the receiver keeps its Python release path.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import socket
import struct
from pathlib import Path

log = logging.getLogger(__name__)

ADDR_STRIDE = 112  # >= sizeof(struct sockaddr_un) (110) and sockaddr_in (16)


def _built_library() -> Path | None:
    """The release routine as the package build compiled it (native/release_queue.c)."""
    try:
        spec = importlib.util.find_spec("overlay._releasequeue")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin)


def sockaddr(family: int, addr: object) -> bytes:
    """A struct sockaddr for sendto: AF_INET (host, port) or AF_UNIX path."""
    if family == socket.AF_INET:
        assert isinstance(addr, tuple)
        head = struct.pack("=H", socket.AF_INET) + struct.pack("!H", int(addr[1]))
        return head + socket.inet_aton(str(addr[0])) + bytes(8)
    if family == socket.AF_UNIX:
        assert isinstance(addr, str | bytes)
        path = os.fsencode(addr)
        return struct.pack("=H", socket.AF_UNIX) + path + b"\0"
    raise ValueError(f"unsupported address family {family}")


class ReleaseQueue:
    """The C release thread of one receiver: push datagrams, take what was sent."""

    COUNTERS = ("held", "pushed", "sent", "failed", "overflow", "batches", "realtime")

    def __init__(
        self,
        lib: ctypes.CDLL,
        *,
        capacity: int,
        spin_ns: int,
        priority: int,
        notify_fd: int = -1,
        cpu: int = -1,
        take_max: int = 1024,
    ) -> None:
        self._lib = lib
        self._push = lib.jasper_rq_push
        handle = lib.jasper_rq_create(capacity, spin_ns, priority, notify_fd, cpu)
        if not handle:
            raise OSError("cannot start the C release thread")
        self._handle: int | None = handle
        self.capacity = capacity
        self._max = take_max
        self._tokens = (ctypes.c_uint64 * take_max)()
        self._stamps = (ctypes.c_int64 * take_max)()
        self._errs = (ctypes.c_int * take_max)()
        self._gaps = (ctypes.c_uint32 * take_max)()
        self._counters = (ctypes.c_uint64 * len(self.COUNTERS))()
        self._stopped = False

    def push(
        self,
        *,
        deadline_ns: int,
        stream_id: int,
        seq: int,
        rank: int,
        token: int,
        fd: int,
        addr: bytes,
        payload: bytes,
        mp_endpoint: int | None = None,
        session: int = 0,
        count: int = 0,
        clock_offset_ns: int = 0,
    ) -> int:
        """Hold `payload` for sendto(fd, addr) at deadline_ns (CLOCK_REALTIME); with fd -1
        nothing is sent, the entry is only stamped then.

        0 when held, -1 when full, -2 when stopping. Entries go out in (deadline, stream, seq,
        rank) order; `token` comes back with the send time.

        With `mp_endpoint` set, `payload` is an MP delivery of `count` messages
        (jasper.mp_spec.frame): the thread writes the release time (CLOCK_REALTIME plus
        `clock_offset_ns`, the node clock) and gap-before (tracked per mp_endpoint and stream)
        into it as it sends; take_mp() reports the messages skipped.
        """
        assert self._handle is not None
        return int(
            self._push(
                self._handle,
                deadline_ns,
                stream_id,
                seq,
                rank,
                token,
                fd,
                addr,
                len(addr),
                payload,
                len(payload),
                mp_endpoint is not None,
                mp_endpoint or 0,
                session,
                count,
                clock_offset_ns,
            )
        )

    def take(self) -> list[tuple[int, int, int]]:
        """Datagrams sent since the last call: (token, send-return time ns, errno or 0)."""
        return [(token, stamp, err) for token, stamp, err, _gap in self.take_mp()]

    def take_mp(self) -> list[tuple[int, int, int, int]]:
        """As take, with the sequence numbers an MP delivery skipped (0: no gap) last."""
        if self._handle is None:
            return []
        out: list[tuple[int, int, int, int]] = []
        while True:
            k = self._lib.jasper_rq_take(
                self._handle, self._tokens, self._stamps, self._errs, self._gaps, self._max
            )
            out.extend(
                zip(self._tokens[:k], self._stamps[:k], self._errs[:k], self._gaps[:k], strict=True)
            )
            if k < self._max:
                return out

    def counters(self) -> dict[str, int]:
        if self._handle is None:
            return dict.fromkeys(self.COUNTERS, 0)
        self._lib.jasper_rq_counters(self._handle, self._counters)
        return dict(zip(self.COUNTERS, self._counters, strict=True))

    def stop(self, *, drain: bool = True, timeout_s: float = 5.0) -> int:
        """Stop the thread (see jasper_rq_stop); the number of datagrams dropped."""
        if self._handle is None or self._stopped:
            return 0
        self._stopped = True
        return int(self._lib.jasper_rq_stop(self._handle, int(drain), int(timeout_s * 1e9)))

    def close(self) -> None:
        """Stop without draining and free the queue (idempotent)."""
        if self._handle is None:
            return
        self.stop(drain=False, timeout_s=0.0)
        self._lib.jasper_rq_free(self._handle)
        self._handle = None


_lib: ctypes.CDLL | None = None
_tried = False


def _library() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        _tried = True
        path = _built_library()
        if path is not None:
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:
                log.info("cannot load %s: %s", path, exc)
            else:
                vp, i64, u64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int
                lib.jasper_rq_create.restype = vp
                lib.jasper_rq_create.argtypes = [i, i64, i, i, i]
                lib.jasper_rq_push.restype = i
                u32 = ctypes.c_uint32
                lib.jasper_rq_push.argtypes = [vp, i64, u64, u64, u64, u64, i, ctypes.c_char_p, i,
                                               ctypes.c_char_p, i, i, u32, u32, u32,
                                               i64]  # fmt: skip
                lib.jasper_rq_take.restype = i
                lib.jasper_rq_take.argtypes = [vp, vp, vp, vp, vp, i]
                lib.jasper_rq_counters.restype = None
                lib.jasper_rq_counters.argtypes = [vp, vp]
                lib.jasper_rq_stop.restype = i
                lib.jasper_rq_stop.argtypes = [vp, i, i64]
                lib.jasper_rq_free.restype = None
                lib.jasper_rq_free.argtypes = [vp]
                _lib = lib
    return _lib


def release_queue(
    *, capacity: int, spin_ns: int, priority: int, notify_fd: int = -1, cpu: int = -1
) -> ReleaseQueue | None:
    """A started C release thread (on `cpu` when >= 0); None when the routine cannot be built
    or loaded here."""
    lib = _library()
    if lib is None:
        return None
    try:
        return ReleaseQueue(
            lib,
            capacity=capacity,
            spin_ns=spin_ns,
            priority=priority,
            notify_fd=notify_fd,
            cpu=cpu,
        )
    except OSError as exc:
        log.info("C release thread unavailable: %s", exc)
        return None
