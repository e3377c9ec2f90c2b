"""Deliver targets: where a receiver may hand an MP's released messages, and who may name one."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from ipaddress import IPv4Address

from controller.store import NodeRow, SubscriptionRow

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


def validate_deliver(text: str) -> str:
    """Pydantic after-validator: the target, unchanged, when well formed."""
    parse_target(text)
    return text


def check_target(
    target: DeliverTarget,
    *,
    mp_id: int,
    endpoint_addr: str,
    folder: str,
    nodes: list[NodeRow],
    subscriptions: list[SubscriptionRow],
) -> str | None:
    """Why this MP may not deliver to `target` from the endpoint at `endpoint_addr`; None when
    it may.

    - udp: only to the endpoint's own address. The receiver sends from the MP's host, so that
      address is the MP's application; a loopback address is allowed only when it is the
      endpoint address itself (on a loopback harness 127.0.0.0/8 is every emulated host).
    - unix: only strictly inside `folder` (normalised, ending in "/").
    - Never to a port the overlay itself listens on (a node's data or probe port at that
      address), nor to a target another MP's subscription delivers to: one MP must not feed
      copies into another MP's application or into the data plane.
    """
    if target.kind == "udp":
        if target.addr != endpoint_addr:
            return (
                f"deliver address {target.addr} is not the endpoint's host {endpoint_addr}: "
                "released data goes only to the MP's own host"
            )
        for n in nodes:
            if n.data_addr != target.addr:
                continue
            ports = n.capacity if n.role == "receiver" else 1  # a relay's capacity is a hint
            if n.port <= target.port < n.port + ports or target.port == n.probe_port:
                return (
                    f"deliver port {target.port} is a data-plane port of node {n.name!r}; "
                    "choose a port of the MP's application"
                )
    else:
        if not target.path.startswith(folder) or len(target.path) <= len(folder):
            return f"deliver path {target.path} is not inside the MP delivery folder {folder}"
    text = f"udp:{target.addr}:{target.port}" if target.kind == "udp" else f"unix:{target.path}"
    for s in subscriptions:
        if s.mp_id != mp_id and s.deliver is not None and _same(s.deliver, text):
            return f"deliver target {text} belongs to another MP's subscription"
    return None


def _same(stored: str, text: str) -> bool:
    if stored == text:
        return True
    try:
        a = parse_target(stored)
    except ValueError:  # rows written before targets were validated
        return False
    b = parse_target(text)
    return a == b
