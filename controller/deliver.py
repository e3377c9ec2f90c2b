"""Deliver targets: which an MP may name (the syntax is jasper/deliver.py's)."""

from __future__ import annotations

from controller.store import NodeRow, SubscriptionRow
from jasper.deliver import ALLOWED, DeliverTarget, parse_target


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


__all__ = ["ALLOWED", "DeliverTarget", "check_target", "parse_target", "validate_deliver"]
