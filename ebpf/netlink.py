"""pyroute2 and network namespaces: an IPRoute per use, off any running asyncio loop, in the
namespace a fast path was attached in."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from ebpf.libbpf import FastPathError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

CLONE_NEWNET = 0x40000000


def netns_inode(pid: int | str = "self") -> int:
    """Inode of the network namespace of `pid` ("self", "thread-self" or a number)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


@contextmanager
def in_netns(ns_fd: int | None) -> Iterator[None]:
    """Run the body in the network namespace `ns_fd` (the one attach ran in), then come back.
    A daemon lives in one namespace; this matters to callers that hop between several."""
    if ns_fd is None or os.fstat(ns_fd).st_ino == netns_inode("thread-self"):
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
            raise FastPathError(f"setns: {os.strerror(ctypes.get_errno())}")
        yield
    finally:
        _libc.setns(home, CLONE_NEWNET)
        os.close(home)


_T = TypeVar("_T")


def off_event_loop(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Run `fn` in a worker thread when the caller's thread runs an asyncio loop: pyroute2's
    synchronous API drives an event loop of its own and refuses to run inside another. The
    worker inherits the caller's network namespace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> _T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=work, name=f"jasper-ebpf-{fn.__name__}")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    return wrapper


def iproute() -> Any:
    """A fresh pyroute2 IPRoute for one `with` block in the calling thread's namespace."""
    from pyroute2 import IPRoute  # only where something is attached: keeps imports light

    return IPRoute()


def ifindex(ipr: Any, ifname: str) -> int:
    """Index of `ifname` in the namespace `ipr` is bound to."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise FastPathError(f"no interface {ifname} in this network namespace")
    return int(found[0])
