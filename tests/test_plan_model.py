"""One plan model: the lab's TreePlan and the controller's Placement agree on every tree."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.placement import Endpoint, Placement, build_shape
from jasper.tree import Forward, default_depth, leaf_name, tree_shape


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


@settings(max_examples=150, deadline=None)
@given(
    leaves=st.integers(1, 700),
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
