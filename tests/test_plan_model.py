"""One plan model: the lab's TreePlan and the controller's Placement agree on every tree."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.layout import lab_layout, topology_from_plan, topology_of
from jasper.placement import Endpoint, Placement, build_shape
from jasper.topology import StreamConfig
from jasper.tree import Forward, PlanTables, default_depth, leaf_name, tree_shape


def placed_like_tree(leaves: int, *, fanout: int, hedge: int, depth: int) -> Placement:
    """The controller's model of `tree_shape(...)`: every slot filled by the relay of the
    same name, leaf i attached where the tree puts it (contiguous even blocks)."""
    shape = build_shape(leaves, fanout=fanout, hedge=hedge, depth=depth)
    slots = [s for level in shape.levels for s in level]
    placement = Placement(shape=shape, slot_node={s: s for s in slots}, publisher="pub")
    leaf_slots = placement.leaf_slots()
    k = len(leaf_slots)
    for p, slot in enumerate(leaf_slots):
        for i in range(p * leaves // k, (p + 1) * leaves // k):
            placement.attach(Endpoint(leaf_name(i), "h"), slot)
    return placement


@settings(max_examples=60, deadline=None)
@given(
    leaves=st.integers(1, 400),
    fanout=st.integers(2, 12),
    hedge=st.integers(0, 5),
    extra_depth=st.sampled_from([-1, 0, 1, 2]),
)
def test_placement_and_tree_plan_agree(
    leaves: int, fanout: int, hedge: int, extra_depth: int
) -> None:
    depth = max(1, default_depth(leaves, fanout) + extra_depth)
    tree = tree_shape(leaves, fanout=fanout, hedge=hedge, depth=depth)
    placed = placed_like_tree(leaves, fanout=fanout, hedge=hedge, depth=depth)
    assert placed.shape.levels == tree.levels
    fwd = placed.forwarding()
    assert fwd.pop("pub") == (Forward("r0.0", False),)
    assert fwd == dict(tree.forwarding)
    for leaf in tree.leaf_names():
        assert placed.parents(leaf) == tree.parents[leaf]


@settings(max_examples=25, deadline=None)
@given(leaves=st.integers(1, 300), fanout=st.integers(2, 8), hedge=st.integers(0, 3))
def test_one_topology_of_for_both_models(leaves: int, fanout: int, hedge: int) -> None:
    tree = tree_shape(leaves, fanout=fanout, hedge=hedge)
    placed = placed_like_tree(leaves, fanout=fanout, hedge=hedge, depth=tree.depth)
    layout = lab_layout(tree, port_base=20000, endpoints_per_receiver=7)
    stream = StreamConfig(id=1, hedge=hedge)
    from_placement = topology_of(placed.tables(), layout, stream=stream)
    assert from_placement == topology_from_plan(tree, port_base=20000, endpoints_per_receiver=7)
    assert from_placement == topology_of(tree.tables(), layout, stream=stream)


def test_a_switch_accepts_both_plans_parents() -> None:
    old = placed_like_tree(12, fanout=3, hedge=1, depth=2)
    new = placed_like_tree(12, fanout=4, hedge=1, depth=2)
    new.publisher = "exchange"
    merged = new.tables().during_switch_from(old.tables())
    relays = dict(merged.relays)
    # r1.3 forwards only in the new plan; old-only relays would be listed without targets.
    assert set(relays) == {"r0.0", "r1.0", "r1.1", "r1.2"} | {r for r, _ in old.tables().relays}
    for name, parents in merged.endpoints:
        assert parents[: len(new.parents(name))] == new.parents(name)
        assert set(parents) == set(new.parents(name)) | set(old.parents(name))
    direct_old = Placement(
        shape=build_shape(0, fanout=2, hedge=1, depth=0), slot_node={}, publisher="publisher"
    )
    direct_old.attach(Endpoint("e0", "h"))
    merged = new.tables().during_switch_from(direct_old.tables())
    # The old plan's placeholder publisher is the new plan's publisher.
    assert dict(merged.endpoints)["e0"][-1] == "exchange"


def test_direct_unicast_is_the_placement_without_relays() -> None:
    alone = Placement(
        shape=build_shape(0, fanout=2, hedge=2, depth=0), slot_node={}, publisher="pub"
    )
    for i in range(5):
        alone.attach(Endpoint(leaf_name(i), "h"))
    assert alone.tables() == PlanTables.direct("pub", [leaf_name(i) for i in range(5)])
