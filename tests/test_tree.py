"""Tree shapes: coverage, hedging parents, send counts, equal-length paths, validation."""

from __future__ import annotations

import subprocess
import sys

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.tree import (
    LEAF_PREFIX,
    RELAY_PREFIX,
    Forward,
    TreePlan,
    default_depth,
    hedged_shape,
    leaf_name,
    parse_node,
    relay_name,
    tree_shape,
)


def check_invariants(plan: TreePlan) -> None:
    """Everything a well-formed plan promises, whatever N, F, H, D."""
    n, h, d = plan.leaves, plan.hedge, plan.depth
    assert plan.levels[0] == ("r0.0",)
    assert len(plan.levels) == d
    for level, names in enumerate(plan.levels):
        assert names == tuple(relay_name(level, i) for i in range(len(names)))
    # Every leaf and every relay but the root is some relay's own child exactly once.
    own_parent: dict[str, str] = {}
    for relay in plan.relays():
        for child in plan.children(relay):
            assert child not in own_parent
            own_parent[child] = relay
    assert set(own_parent) == set(plan.leaf_names()) | (set(plan.relays()) - {"r0.0"})
    # Every leaf is reachable from the root in the graph, by exactly depth hops.
    g = plan.graph
    lengths = nx.single_source_shortest_path_length(g, "r0.0")
    for leaf in plan.leaf_names():
        assert lengths[leaf] == d
        assert g.nodes[leaf]["level"] == d
    for node, ps in plan.parents.items():
        assert len(set(ps)) == len(ps), f"{node} has a repeated parent {ps}"
        if node == "r0.0":
            assert ps == ()
            continue
        assert ps[0] == own_parent[node]
        # Hedge copies travel equal-length paths: every parent is one level up.
        assert {plan.level_of(p) for p in ps} == {plan.level_of(node) - 1}
        if plan.level_of(node) == 1:
            assert len(ps) == 1
        else:
            siblings = len(plan.children(plan.parents[ps[0]][0]))
            assert len(ps) == min(h, siblings - 1) + 1
        for i, p in enumerate(ps):
            assert Forward(node, hedge=i > 0) in plan.forwarding[p]
            assert g.edges[p, node]["hedge"] is (i > 0)
    # The forwarding tables and the parents agree edge for edge, and match the graph.
    edges = {(r, f.target) for r, table in plan.forwarding.items() for f in table}
    assert edges == {(p, c) for c, ps in plan.parents.items() for p in ps}
    assert edges == set(g.edges)
    for table in plan.forwarding.values():
        hedges = [f.hedge for f in table]
        assert hedges == sorted(hedges), "own children come before hedge copies"
        assert len({f.target for f in table}) == len(table)
    assert len(plan.leaf_names()) == n


def test_names() -> None:
    assert relay_name(0, 0) == "r0.0"
    assert relay_name(1, 3) == "r1.3"
    assert leaf_name(0) == "e0"
    assert RELAY_PREFIX == "r" and LEAF_PREFIX == "e"
    assert parse_node("r2.17") == (2, 17)
    assert parse_node("e41") == (None, 41)
    for bad in ("x1", "r1", "e", "rA.1"):
        with pytest.raises(ValueError):
            parse_node(bad)


@pytest.mark.parametrize(
    ("leaves", "fanout", "depth"),
    [(1, 10, 1), (10, 10, 1), (31, 10, 1), (32, 10, 2), (100, 10, 2), (316, 10, 2),
     (317, 10, 3), (1000, 10, 3), (5000, 10, 4), (1000, 32, 2), (1000, 6, 4), (2, 2, 1)],
)  # fmt: skip
def test_default_depth_is_rounded_log(leaves: int, fanout: int, depth: int) -> None:
    assert default_depth(leaves, fanout) == depth


def test_paper_shapes_at_1000() -> None:
    three = tree_shape(1000, fanout=10, hedge=2)
    assert three.depth == 3
    assert [len(level) for level in three.levels] == [1, 10, 100]
    assert three.level_fanouts == (10, 10, 10)
    # (H+1)*F sends per relay below the root; the root's children have no siblings to cover.
    assert three.sends_per_message("r0.0") == 10
    for relay in three.relays()[1:]:
        assert three.sends_per_message(relay) == 30
    for leaf in three.leaf_names():
        assert len(three.parents[leaf]) == 3

    two = tree_shape(1000, fanout=32, hedge=2, depth=2)
    assert [len(level) for level in two.levels] == [1, 32]

    four = tree_shape(1000, fanout=6, hedge=2, depth=4)
    assert [len(level) for level in four.levels] == [1, 5, 28, 167]
    assert max(four.level_fanouts) == 6
    for plan in (three, two, four):
        check_invariants(plan)


def test_fanout_raised_when_depth_too_small() -> None:
    plan = tree_shape(1000, fanout=10, hedge=1, depth=2)
    # 10**2 < 1000, so each level needs 32 children (32**2 = 1024).
    assert plan.level_fanouts == (32, 32)
    assert plan.fanout == 10
    check_invariants(plan)


def test_small_example_is_exact() -> None:
    plan = tree_shape(4, fanout=2, hedge=1)
    assert plan.depth == 2
    assert plan.levels == (("r0.0",), ("r1.0", "r1.1"))
    assert plan.forwarding["r0.0"] == (Forward("r1.0", False), Forward("r1.1", False))
    assert plan.forwarding["r1.0"] == (
        Forward("e0", False),
        Forward("e1", False),
        Forward("e2", True),
        Forward("e3", True),
    )
    assert plan.children("r1.1") == ("e2", "e3")
    assert plan.parents["e0"] == ("r1.0", "r1.1")
    assert plan.parents["e3"] == ("r1.1", "r1.0")
    assert plan.parents["r1.0"] == ("r0.0",)


def test_hedge_wraps_cyclically_and_caps_at_siblings() -> None:
    plan = tree_shape(100, fanout=10, hedge=5)
    # Ten sibling relays at level 1; H=5 < 9 so each leaf has 6 parents, the hedgers being
    # the five siblings before its own parent (cyclically).
    assert plan.parents["e0"] == ("r1.0", "r1.9", "r1.8", "r1.7", "r1.6", "r1.5")
    capped = tree_shape(9, fanout=3, hedge=5, depth=2)
    for leaf in capped.leaf_names():
        assert len(capped.parents[leaf]) == 3  # only 3 siblings
    check_invariants(capped)


def test_deterministic() -> None:
    a = tree_shape(777, fanout=7, hedge=2)
    b = tree_shape(777, fanout=7, hedge=2)
    assert a == b
    assert hash(a) == hash(b)
    assert a.forwarding == b.forwarding
    assert nx.utils.graphs_equal(a.graph, b.graph)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"leaves": 0}, "leaves"),
        ({"leaves": 10, "fanout": 1}, "fanout"),
        ({"leaves": 10, "hedge": -1}, "hedge"),
        ({"leaves": 10, "depth": 0}, "depth"),
        ({"leaves": 10, "depth": 65}, "depth"),
    ],
)
def test_validation(kwargs: dict[str, int], message: str) -> None:
    leaves = kwargs.pop("leaves")
    with pytest.raises(ValueError, match=message):
        tree_shape(leaves, **kwargs)


def test_level_of_rejects_unknown_nodes() -> None:
    plan = tree_shape(20, fanout=5, hedge=1)
    assert plan.level_of("e19") == plan.depth
    assert plan.level_of("r0.0") == 0
    for bad in ("e20", "r9.0", "r1.99"):
        with pytest.raises(ValueError):
            plan.level_of(bad)


@settings(max_examples=150, deadline=None)
@given(
    leaves=st.integers(min_value=1, max_value=600),
    fanout=st.integers(min_value=2, max_value=12),
    hedge=st.integers(min_value=0, max_value=5),
    extra_depth=st.sampled_from([None, -1, 0, 1, 2]),
)
def test_invariants_hold_for_any_shape(
    leaves: int, fanout: int, hedge: int, extra_depth: int | None
) -> None:
    depth = None
    if extra_depth is not None:
        depth = max(1, default_depth(leaves, fanout) + extra_depth)
    plan = tree_shape(leaves, fanout=fanout, hedge=hedge, depth=depth)
    check_invariants(plan)
    assert plan.depth == (depth or default_depth(leaves, fanout))
    f = max(plan.level_fanouts)
    assert f**plan.depth >= leaves
    # (H+1)*F sends per relay wherever the relay and H siblings each have F own children.
    for level in range(1, plan.depth):
        for relay in plan.levels[level]:
            own = plan.children(relay)
            group = plan.children(plan.parents[relay][0])
            covered = [plan.children(s) for s in group]
            if all(len(c) == f for c in covered) and len(group) > hedge:
                assert plan.sends_per_message(relay) == (hedge + 1) * f
            assert len(own) <= plan.sends_per_message(relay)


def test_importing_the_names_does_not_load_networkx() -> None:
    # Data-plane daemons use the naming helpers; networkx (40+ MB) loads only in tree_shape.
    code = "import sys, jasper.tree; assert 'networkx' not in sys.modules, 'networkx loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def min_parents(plan: TreePlan) -> int:
    return min(len(set(plan.parents[leaf])) for leaf in plan.leaf_names())


@pytest.mark.parametrize("leaves", [9, 12, 20, 30, 31])
def test_small_trees_keep_hedging(leaves: int) -> None:
    # The paper's depth is 1 here: the root alone, no siblings, one copy per endpoint.
    assert default_depth(leaves, 10) == 1
    assert min_parents(tree_shape(leaves, fanout=10, hedge=2)) == 1
    fanout, depth = hedged_shape(leaves, fanout=10, hedge=2)
    plan = tree_shape(leaves, fanout=fanout, hedge=2, depth=depth)
    assert depth == 2
    assert fanout <= 10
    assert min_parents(plan) == 3
    check_invariants(plan)


def test_hedged_shape_leaves_other_trees_alone() -> None:
    assert hedged_shape(100, fanout=10, hedge=2) == (10, 2)
    assert hedged_shape(1000, fanout=10, hedge=2) == (10, 3)
    assert hedged_shape(20, fanout=10, hedge=0) == (10, 1)
    # Too few endpoints for H+1 relays below the root: the most parents there can be.
    assert hedged_shape(2, fanout=10, hedge=2) == (10, 1)
    fanout, depth = hedged_shape(6, fanout=10, hedge=2)
    assert min_parents(tree_shape(6, fanout=fanout, hedge=2, depth=depth)) == 2
