"""Release without the GIL: a small C routine that sleeps, spins and sends a batch at a deadline.

A Python release thread needs the GIL at the deadline, and the receive loop may hold it; a
ctypes call releases the GIL for its whole duration, so the wait, the spin and the sends of one
batch run undisturbed. Compiled on first use with the system C compiler into a cache folder;
when that is not possible the receiver keeps its Python release path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = r"""/* jasper_release.c: sleep to a deadline, spin to it, send a batch, stamp each send. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <sys/socket.h>
#include <time.h>

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* deadline_ns and spin_ns on CLOCK_REALTIME; one datagram per entry; stamps[i] is the time the
 * i-th send returned, errs[i] its errno (0 when sent). Returns the number sent. */
int jasper_release_at(int64_t deadline_ns, int64_t spin_ns, int n, const int *fds,
              const unsigned char *addrs, const int *addr_lens, int addr_stride,
              const unsigned char *const *bufs, const int *lens, int64_t *stamps, int *errs)
{
    int64_t wake = deadline_ns - spin_ns;
    if (wake > now_ns()) {
        struct timespec ts = { .tv_sec = wake / 1000000000LL, .tv_nsec = wake % 1000000000LL };
        while (clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &ts, 0) == EINTR)
            ;
    }
    while (now_ns() < deadline_ns)
        ;
    int sent = 0;
    for (int i = 0; i < n; i++) {
        ssize_t rc = sendto(fds[i], bufs[i], (size_t)lens[i], MSG_DONTWAIT,
                    (const struct sockaddr *)(addrs + (long)i * addr_stride),
                    (socklen_t)addr_lens[i]);
        stamps[i] = now_ns();
        errs[i] = rc < 0 ? errno : 0;
        sent += rc >= 0;
    }
    return sent;
}
"""

ADDR_STRIDE = 112  # >= sizeof(struct sockaddr_un) (110) and sockaddr_in (16)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jasper"


def _compile() -> Path | None:
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"jasper-{os.getuid()}"):
        lib = folder / f"release-{digest}.so"
        if lib.exists():
            return lib
        cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            return None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            src = folder / f"release-{digest}.{os.getpid()}.c"
            tmp = folder / f"release-{digest}.{os.getpid()}.so"
            src.write_text(SOURCE)
            subprocess.run(
                [cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)],
                check=True,
                capture_output=True,
                timeout=60,
            )
            os.replace(tmp, lib)  # atomic: processes compiling at once do not clash
            src.unlink(missing_ok=True)
            return lib
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("cannot build the C release routine in %s: %s", folder, exc)
    return None


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


class BatchSender:
    """Wraps jasper_release_at; reuses its argument arrays between batches."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.jasper_release_at
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self._size = 0
        self._grow(64)

    def _grow(self, n: int) -> None:
        self._size = n
        self.fds = (ctypes.c_int * n)()
        self.addrs = (ctypes.c_ubyte * (n * ADDR_STRIDE))()
        self.addr_lens = (ctypes.c_int * n)()
        self.bufs = (ctypes.c_char_p * n)()
        self.lens = (ctypes.c_int * n)()
        self.stamps = (ctypes.c_int64 * n)()
        self.errs = (ctypes.c_int * n)()

    def send_at(
        self,
        deadline_ns: int,
        spin_ns: int,
        items: Sequence[tuple[int, bytes, bytes]],
    ) -> tuple[list[int], list[int]]:
        """Send items (fd, sockaddr, payload) at deadline_ns (CLOCK_REALTIME).

        Returns (send-return times, errnos) per item. The GIL is released meanwhile.
        """
        n = len(items)
        if n > self._size:
            self._grow(max(n, 2 * self._size))
        keep = []
        for i, (fd, addr, payload) in enumerate(items):
            self.fds[i] = fd
            ctypes.memmove(ctypes.addressof(self.addrs) + i * ADDR_STRIDE, addr, len(addr))
            self.addr_lens[i] = len(addr)
            self.bufs[i] = payload
            self.lens[i] = len(payload)
            keep.append(payload)
        self._fn(
            deadline_ns,
            spin_ns,
            n,
            self.fds,
            self.addrs,
            self.addr_lens,
            ADDR_STRIDE,
            self.bufs,
            self.lens,
            self.stamps,
            self.errs,
        )
        return list(self.stamps[:n]), list(self.errs[:n])


_loaded: BatchSender | None = None
_tried = False


def batch_sender() -> BatchSender | None:
    """The C release routine, built and loaded once per process; None when unavailable."""
    global _loaded, _tried
    if not _tried:
        _tried = True
        lib = _compile()
        if lib is not None:
            try:
                _loaded = BatchSender(ctypes.CDLL(str(lib)))
            except OSError as exc:
                log.info("cannot load %s: %s", lib, exc)
    return _loaded
