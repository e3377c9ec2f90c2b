"""Deliver targets: the syntax of where a receiver hands an MP's released messages."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from ipaddress import IPv4Address

ALLOWED = (
    "deliver must be udp:ADDR:PORT (ADDR the endpoint's own IPv4 address, PORT 1-65535) "
    "or unix:PATH (an absolute path inside the controller's MP delivery folder)"
)
"""What the 422 answers say is allowed."""

SUN_PATH_MAX = 107
"""Bytes of a unix socket path that fit sockaddr_un.sun_path with its terminating NUL."""

_UDP = re.compile(r"udp:(?P<addr>[0-9.]{7,15}):(?P<port>[0-9]{1,5})")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class DeliverTarget:
    """A deliver target that is well formed; whether this MP may use it is `check_target`'s."""

    kind: str
    """"udp" or "unix"."""
    addr: str = ""
    """udp: the IPv4 address, dotted quad."""
    port: int = 0
    """udp: the port, 1-65535."""
    path: str = ""
    """unix: the absolute, normalised path."""


def parse_target(text: str) -> DeliverTarget:
    """The target `text` names; ValueError saying what is allowed when it is malformed.

    Nothing here resolves names or touches a file system: the receiver on the MP's host is
    the one that opens the target, so the rules are purely syntactic.
    """
    if text.startswith("udp:"):
        m = _UDP.fullmatch(text)
        if m is None:
            raise ValueError(f"{ALLOWED}; got a malformed udp target")
        try:
            addr = IPv4Address(m["addr"])
        except ValueError:
            raise ValueError(f"{ALLOWED}; {m['addr']!r} is not an IPv4 address") from None
        port = int(m["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"{ALLOWED}; port {port} is out of range")
        return DeliverTarget("udp", addr=str(addr), port=port)
    if text.startswith("unix:"):
        path = text[5:]
        if "\x00" in path:
            raise ValueError(f"{ALLOWED}; the path holds a NUL byte")
        if not path.startswith("/"):
            raise ValueError(f"{ALLOWED}; the path is not absolute")
        segments = path.split("/")[1:]
        if ".." in segments or "." in segments:
            raise ValueError(f"{ALLOWED}; the path holds '.' or '..'")
        if posixpath.normpath(path) != path:
            raise ValueError(f"{ALLOWED}; the path is not normalised (// or a trailing /)")
        if not all(_PATH_SEGMENT.fullmatch(s) for s in segments):
            raise ValueError(
                f"{ALLOWED}; path names may hold only letters, digits, '.', '_' and '-', "
                "64 at most, not starting with '.'"
            )
        if len(path.encode()) > SUN_PATH_MAX:
            raise ValueError(f"{ALLOWED}; the path is longer than {SUN_PATH_MAX} bytes")
        return DeliverTarget("unix", path=path)
    raise ValueError(ALLOWED)


__all__ = ["ALLOWED", "SUN_PATH_MAX", "DeliverTarget", "parse_target"]
