"""Laying a plan out on addresses and ports: `topology_of(plan, layout)` and the lab's layout."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jasper.topology import (
    DEFAULT_HOLD_NS,
    EndpointConfig,
    PublisherConfig,
    ReceiverConfig,
    RelayConfig,
    StreamAuth,
    StreamConfig,
    Target,
    Topology,
)
from jasper.tree import PlanTables, TreePlan

PUBLISHER_NAME = "pub"


@dataclass(frozen=True)
class Spot:
    """Where one endpoint lives."""

    host: str
    """Receiver host (process) that hosts it."""
    port: int
    """UDP port on the host's address where its copies arrive."""
    deliver: str | None = None
    """Where released messages go ("udp:HOST:PORT", "unix:/path"), or None: in process."""
    mp: str | None = None
    """The market participant it belongs to, when known."""


@dataclass(frozen=True)
class Layout:
    """Where the nodes of a plan live: the lab's loopback ports, an emulated region's hosts,
    or the controller's registered nodes."""

    publisher: str
    """The publisher's name in the topology (it stands for the plan's own publisher name)."""
    publisher_addr: str
    relays: Mapping[str, tuple[str, int]]
    """Relay -> (addr, port); a relay of the plan missing here is left out."""
    hosts: Mapping[str, str]
    """Receiver host -> addr, in the order the topology lists them (hosts without endpoints
    are listed too)."""
    endpoints: Mapping[str, Spot]
    """Endpoint -> where it lives; an endpoint of the plan missing here, or on a host not in
    `hosts`, is left out."""
    publisher_port: int | None = None
    """The port the publisher sends from and takes NAKs on (docs/recovery.md); None: an
    ephemeral one, and no loss recovery."""


def topology_of(
    plan: PlanTables,
    layout: Layout,
    *,
    stream: StreamConfig,
    plan_epoch: int = 1,
    link_model: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Topology:
    """The Topology of `plan` (its `tables()`) with every node where `layout` puts it.

    Forwarding tables keep the plan's send order; endpoints keep the plan's order within
    their host; parents keep the plan's order (own parent first).
    """

    def named(node: str) -> str:
        return layout.publisher if node == plan.publisher else node

    relays = tuple(
        RelayConfig(
            name=name,
            addr=layout.relays[name][0],
            port=layout.relays[name][1],
            targets=tuple(Target(node=f.target, hedge=f.hedge) for f in table),
        )
        for name, table in plan.relays
        if name in layout.relays
    )
    per_host: dict[str, list[EndpointConfig]] = {host: [] for host in layout.hosts}
    for name, parents in plan.endpoints:
        spot = layout.endpoints.get(name)
        if spot is None or spot.host not in per_host:
            continue
        per_host[spot.host].append(
            EndpointConfig(
                name=name,
                port=spot.port,
                parents=tuple(map(named, parents)),
                deliver=spot.deliver,
                mp=spot.mp,
            )
        )
    return Topology(
        stream=stream,
        publisher=PublisherConfig(
            name=layout.publisher,
            addr=layout.publisher_addr,
            targets=tuple(Target(node=f.target, hedge=f.hedge) for f in plan.publisher_targets),
            port=layout.publisher_port,
        ),
        relays=relays,
        receivers=tuple(
            ReceiverConfig(name=host, addr=layout.hosts[host], endpoints=tuple(eps))
            for host, eps in per_host.items()
        ),
        plan_epoch=plan_epoch,
        link_model=dict(link_model) if link_model is not None else None,
        extra=dict(extra or {}),
    )


def receiver_host_name(index: int) -> str:
    """Name of receiver host `index`: "h0", "h1", ..."""
    return f"h{index}"


def ports_needed(plan: TreePlan) -> int:
    """Ports a layout of `plan` takes from its base: one per relay and one per endpoint."""
    return len(plan.relays()) + plan.leaves


def lab_layout(
    plan: TreePlan,
    *,
    addr: str = "127.0.0.1",
    port_base: int = 7000,
    endpoints_per_receiver: int = 20,
    deliver_port_base: int | None = None,
) -> Layout:
    """Every node of `plan` on `addr`: relays take ports port_base, port_base+1, ... in level
    order, endpoints follow in leaf order, so the layout spans `ports_needed(plan)`
    consecutive ports. Endpoints are grouped `endpoints_per_receiver` per receiver host ("h0"
    hosts e0..e19 by default). With `deliver_port_base`, endpoint i delivers to
    udp:addr:(deliver_port_base + i); without, in process."""
    if endpoints_per_receiver < 1:
        raise ValueError(f"endpoints_per_receiver must be >= 1, got {endpoints_per_receiver}")
    if port_base < 1 or port_base + ports_needed(plan) - 1 > 65535:
        raise ValueError(f"{ports_needed(plan)} ports from {port_base} do not fit below 65536")
    relays = plan.relays()
    leaf_base = port_base + len(relays)
    endpoints = {
        leaf: Spot(
            host=receiver_host_name(i // endpoints_per_receiver),
            port=leaf_base + i,
            deliver=None if deliver_port_base is None else f"udp:{addr}:{deliver_port_base + i}",
        )
        for i, leaf in enumerate(plan.leaf_names())
    }
    return Layout(
        publisher=PUBLISHER_NAME,
        publisher_addr=addr,
        relays={r: (addr, port_base + i) for i, r in enumerate(relays)},
        hosts={spot.host: addr for spot in endpoints.values()},
        endpoints=endpoints,
    )


def topology_from_plan(
    plan: TreePlan,
    *,
    addr: str = "127.0.0.1",
    port_base: int = 7000,
    endpoints_per_receiver: int = 20,
    stream_id: int = 1,
    hold_ns: int = DEFAULT_HOLD_NS,
    plan_epoch: int = 1,
    link_model: Mapping[str, Any] | None = None,
    deliver_port_base: int | None = None,
    auth: StreamAuth | None = None,
    session: int | None = None,
) -> Topology:
    """A Topology placing every node of `plan` on `addr` (see `lab_layout`). `auth` and
    `session` go into the stream as the controller would set them (a lab topology without
    `auth` is unauthenticated)."""
    layout = lab_layout(
        plan,
        addr=addr,
        port_base=port_base,
        endpoints_per_receiver=endpoints_per_receiver,
        deliver_port_base=deliver_port_base,
    )
    return topology_of(
        plan.tables(),
        layout,
        stream=StreamConfig(
            id=stream_id, hedge=plan.hedge, hold_ns=hold_ns, auth=auth, session=session
        ),
        plan_epoch=plan_epoch,
        link_model=link_model,
    )


def relay_groups(plan: TreePlan, per_process: int) -> list[list[str]]:
    """Relays split into processes of at most `per_process`, the root alone in the first."""
    if per_process < 1:
        raise ValueError(f"per_process must be >= 1, got {per_process}")
    root, *rest = plan.relays()
    groups = [[root]]
    for i in range(0, len(rest), per_process):
        groups.append(list(rest[i : i + per_process]))
    return groups
