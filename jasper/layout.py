"""Laying a TreePlan out on addresses and ports: the static Topology of a single-host run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jasper.topology import (
    EndpointConfig,
    PublisherConfig,
    ReceiverConfig,
    RelayConfig,
    StreamAuth,
    StreamConfig,
    Target,
    Topology,
)
from jasper.tree import TreePlan

PUBLISHER_NAME = "pub"


def receiver_host_name(index: int) -> str:
    """Name of receiver host `index`: "h0", "h1", ..."""
    return f"h{index}"


def ports_needed(plan: TreePlan) -> int:
    """Ports a layout of `plan` takes from its base: one per relay and one per endpoint."""
    return len(plan.relays()) + plan.leaves


def topology_from_plan(
    plan: TreePlan,
    *,
    addr: str = "127.0.0.1",
    port_base: int = 7000,
    endpoints_per_receiver: int = 20,
    stream_id: int = 1,
    hold_ns: int = 500_000,
    plan_epoch: int = 1,
    link_model: Mapping[str, Any] | None = None,
    deliver_port_base: int | None = None,
    auth: StreamAuth | None = None,
    session: int | None = None,
) -> Topology:
    """A Topology placing every node of `plan` on `addr`.

    Relays take ports port_base, port_base+1, ... in level order; endpoints follow in leaf
    order, so the layout spans `ports_needed(plan)` consecutive ports. Endpoints are grouped
    `endpoints_per_receiver` per receiver host ("h0" hosts e0..e19 by default). With
    `deliver_port_base`, endpoint i delivers to udp:addr:(deliver_port_base + i); without, in
    process. `auth` and `session` go into the stream as the controller would set them (a lab
    topology without `auth` is unauthenticated).
    """
    if endpoints_per_receiver < 1:
        raise ValueError(f"endpoints_per_receiver must be >= 1, got {endpoints_per_receiver}")
    if port_base < 1 or port_base + ports_needed(plan) - 1 > 65535:
        raise ValueError(f"{ports_needed(plan)} ports from {port_base} do not fit below 65536")
    relays = plan.relays()
    port_of = {name: port_base + i for i, name in enumerate(relays)}
    relay_configs = tuple(
        RelayConfig(
            name=r,
            addr=addr,
            port=port_of[r],
            targets=tuple(Target(node=f.target, hedge=f.hedge) for f in plan.forwarding[r]),
        )
        for r in relays
    )
    leaf_base = port_base + len(relays)
    leaves = plan.leaf_names()
    hosts = []
    for h, start in enumerate(range(0, len(leaves), endpoints_per_receiver)):
        eps = []
        for i in range(start, min(start + endpoints_per_receiver, len(leaves))):
            deliver = None
            if deliver_port_base is not None:
                deliver = f"udp:{addr}:{deliver_port_base + i}"
            eps.append(
                EndpointConfig(
                    name=leaves[i],
                    port=leaf_base + i,
                    parents=plan.parents[leaves[i]],
                    deliver=deliver,
                )
            )
        hosts.append(ReceiverConfig(name=receiver_host_name(h), addr=addr, endpoints=tuple(eps)))
    return Topology(
        stream=StreamConfig(
            id=stream_id, hedge=plan.hedge, hold_ns=hold_ns, auth=auth, session=session
        ),
        publisher=PublisherConfig(
            name=PUBLISHER_NAME, addr=addr, targets=(Target(node=plan.levels[0][0]),)
        ),
        relays=relay_configs,
        receivers=tuple(hosts),
        plan_epoch=plan_epoch,
        link_model=dict(link_model) if link_model is not None else None,
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
