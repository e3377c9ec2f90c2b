"""Layout: a TreePlan placed on loopback ports becomes a valid, round-trippable Topology."""

from __future__ import annotations

import json

import pytest

from jasper.layout import ports_needed, relay_groups, topology_from_plan
from jasper.topology import parse_topology
from jasper.tree import tree_shape


def test_layout_round_trips_and_keeps_the_plan() -> None:
    plan = tree_shape(100, fanout=10, hedge=2)
    topo = topology_from_plan(plan, port_base=40000, hold_ns=2_000_000, link_model={"seed": 1})
    again = parse_topology(json.loads(json.dumps(topo.to_dict())))
    assert again == topo
    assert topo.stream.hold_ns == 2_000_000 and topo.stream.hedge == 2
    assert topo.publisher.targets[0].node == "r0.0"
    ports = sorted(p for _, p in topo.addresses().values())
    assert ports == list(range(40000, 40000 + ports_needed(plan)))
    for r in topo.relays:
        assert [(t.node, t.hedge) for t in r.targets] == [
            (f.target, f.hedge) for f in plan.forwarding[r.name]
        ]
    for _, e in topo.endpoints():
        assert e.parents == plan.parents[e.name]
        assert len(set(e.parents)) == 3


def test_endpoints_grouped_per_receiver_host() -> None:
    plan = tree_shape(45, fanout=10, hedge=1)
    topo = topology_from_plan(plan, endpoints_per_receiver=20)
    assert [len(h.endpoints) for h in topo.receivers] == [20, 20, 5]
    assert [h.name for h in topo.receivers] == ["h0", "h1", "h2"]
    assert topo.receivers[1].endpoints[0].name == "e20"


def test_udp_delivery_targets() -> None:
    plan = tree_shape(5, fanout=10, hedge=0)
    topo = topology_from_plan(plan, port_base=30000, deliver_port_base=31000, addr="127.0.0.2")
    assert [e.deliver for _, e in topo.endpoints()] == [
        f"udp:127.0.0.2:{31000 + i}" for i in range(5)
    ]


def test_ports_must_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        topology_from_plan(tree_shape(100), port_base=65500)
    with pytest.raises(ValueError):
        topology_from_plan(tree_shape(10), endpoints_per_receiver=0)


def test_relay_groups_root_alone() -> None:
    plan = tree_shape(1000, fanout=10, hedge=2)
    groups = relay_groups(plan, 12)
    assert groups[0] == ["r0.0"]
    assert all(len(g) <= 12 for g in groups)
    assert sorted(n for g in groups for n in g) == sorted(plan.relays())
