"""Tree shapes for the relay overlay: levels, fan-out, sibling hedging, forwarding tables."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import networkx as nx

RELAY_PREFIX = "r"
LEAF_PREFIX = "e"

DEFAULT_FANOUT = 10
"""The paper's fan-out F: near optimal with depth round(log10 N) (DESIGN.md)."""
DEFAULT_HEDGE = 2
"""The paper's sibling hedging H: each endpoint gets H+1 copies; the default up to ~5000
receivers."""

# A deeper tree than this is never useful (F >= 2 covers any realistic N far earlier) and
# would only let a typo build a huge chain of single relays.
MAX_DEPTH = 64


def relay_name(level: int, index: int) -> str:
    """Name of relay `index` at `level`: "r0.0" is the root, "r1.3" the 4th relay of level 1."""
    if level < 0 or index < 0:
        raise ValueError(f"relay level and index must be >= 0, got level={level} index={index}")
    return f"{RELAY_PREFIX}{level}.{index}"


def leaf_name(index: int) -> str:
    """Name of leaf `index`: "e0".."e{N-1}" are the market participants' endpoints."""
    if index < 0:
        raise ValueError(f"leaf index must be >= 0, got {index}")
    return f"{LEAF_PREFIX}{index}"


def parse_node(name: str) -> tuple[int | None, int]:
    """Split a node name into (level, index); level is None for a leaf ("e7" -> (None, 7))."""
    try:
        if name.startswith(LEAF_PREFIX):
            return None, int(name[len(LEAF_PREFIX) :])
        if name.startswith(RELAY_PREFIX):
            level, index = name[len(RELAY_PREFIX) :].split(".")
            return int(level), int(index)
    except ValueError:
        pass
    raise ValueError(f"not a relay or leaf name: {name!r}")


@dataclass(frozen=True)
class Forward:
    """One entry of a relay's forwarding table."""

    target: str
    """Relay or leaf name the copy goes to."""
    hedge: bool
    """True when sent as a sibling hedge copy, False for the relay's own child."""


@dataclass(frozen=True)
class PlanTables:
    """What a topology needs of any plan (a TreePlan, or the controller's Placement): who
    sends to whom in send order, and who feeds each endpoint. `jasper.layout.topology_of`
    puts it on addresses."""

    publisher: str | None
    """The name the plan gives its publisher (it may appear among parents); None: unnamed."""
    publisher_targets: tuple[Forward, ...]
    """What the publisher sends to: the root relay, or every endpoint when there is none."""
    relays: tuple[tuple[str, tuple[Forward, ...]], ...]
    """(relay, forwarding table) level by level, root first."""
    endpoints: tuple[tuple[str, tuple[str, ...]], ...]
    """(endpoint, its parents, own first) in the plan's leaf order."""

    @classmethod
    def direct(cls, publisher: str, endpoints: Iterable[str]) -> PlanTables:
        """No relay: the publisher sends to every endpoint itself (direct unicast)."""
        names = tuple(endpoints)
        return cls(
            publisher=publisher,
            publisher_targets=tuple(Forward(e, False) for e in names),
            relays=(),
            endpoints=tuple((e, (publisher,)) for e in names),
        )

    def during_switch_from(self, old: PlanTables) -> PlanTables:
        """This plan while the data plane still carries `old` (make before break): relays
        only the old plan uses are named, with no targets (they forward by the old plan,
        which they keep), and each endpoint accepts the parents of both plans."""
        listed = {name for name, _ in self.relays}
        gone = tuple((name, ()) for name, _ in old.relays if name not in listed)

        def same(node: str) -> str:
            # The old plan may name the publisher otherwise (say, before one registered).
            return self.publisher if node == old.publisher and self.publisher else node

        before = {name: tuple(map(same, ps)) for name, ps in old.endpoints}
        endpoints = tuple(
            (name, (*ps, *(p for p in before.get(name, ()) if p not in ps)))
            for name, ps in self.endpoints
        )
        return replace(self, relays=(*self.relays, *gone), endpoints=endpoints)


@dataclass(frozen=True)
class TreePlan:
    """A relay tree for `leaves` endpoints: who sends to whom, and in which order.

    The publisher sends to the root relay "r0.0". Relays sit at levels 0..depth-1, leaves
    (endpoints) at level `depth`. Forwarding tables list own children first, then hedge
    copies, which is also the order a relay sends them in.
    """

    leaves: int
    """Number of leaves N (endpoints)."""
    fanout: int
    """Requested fan-out F; see `level_fanouts` for what each level actually got."""
    hedge: int
    """Sibling hedging H: each relay also feeds the children of H of its siblings."""
    depth: int
    """Hops from the root to a leaf (D)."""
    levels: tuple[tuple[str, ...], ...]
    """Relay names per level; levels[0] == ("r0.0",)."""
    forwarding: Mapping[str, tuple[Forward, ...]]
    """Relay -> targets in send order: own children first, then hedge copies."""
    parents: Mapping[str, tuple[str, ...]]
    """Node (relay or leaf) -> the relays that send it a copy, own parent first."""
    graph: nx.DiGraph = field(compare=False, repr=False)
    """Edges relay -> target with attribute `hedge: bool`; node attribute `level`."""
    level_fanouts: tuple[int, ...] = ()
    """Most own children of any relay, per relay level (length `depth`)."""

    def __hash__(self) -> int:
        # The plan is a pure function of these four numbers.
        return hash((self.leaves, self.fanout, self.hedge, self.depth))

    def children(self, relay: str) -> tuple[str, ...]:
        """Own children of `relay`, without hedge targets."""
        return tuple(f.target for f in self.forwarding[relay] if not f.hedge)

    def leaf_names(self) -> tuple[str, ...]:
        """All leaves "e0".."e{N-1}" in index order."""
        return tuple(leaf_name(i) for i in range(self.leaves))

    def relays(self) -> tuple[str, ...]:
        """All relays, level by level."""
        return tuple(r for level in self.levels for r in level)

    def level_of(self, node: str) -> int:
        """Level of a relay, or `depth` for a leaf."""
        level, index = parse_node(node)
        if level is None:
            if index >= self.leaves:
                raise ValueError(f"no leaf {node!r} in a tree of {self.leaves} leaves")
            return self.depth
        if level >= self.depth or index >= len(self.levels[level]):
            raise ValueError(f"no relay {node!r} in this tree")
        return level

    def sends_per_message(self, relay: str) -> int:
        """Copies `relay` sends for each message (own children plus hedge copies)."""
        return len(self.forwarding[relay])

    def tables(self) -> PlanTables:
        """The plan's forwarding and parents, for `jasper.layout.topology_of`."""
        return PlanTables(
            publisher=None,
            publisher_targets=(Forward(self.levels[0][0], False),),
            relays=tuple((r, self.forwarding[r]) for r in self.relays()),
            endpoints=tuple((leaf, self.parents[leaf]) for leaf in self.leaf_names()),
        )


def default_depth(leaves: int, fanout: int) -> int:
    """The paper's depth for N leaves and fan-out F: D = round(log_F N), at least 1.

    Computed in integers (round half up on the exponent), so N = F**k gives exactly k.
    """
    _check_counts(leaves, fanout)
    # round(log_F N) = k  <=>  F**(k - 1/2) <= N < F**(k + 1/2)  <=>  F**(2k-1) <= N**2 < F**(2k+1)
    k = 0
    while fanout ** (2 * k + 1) <= leaves * leaves:
        k += 1
    return max(1, k)


def hedged_shape(leaves: int, *, fanout: int, hedge: int) -> tuple[int, int]:
    """(fan-out, depth) for `tree_shape` so that hedging reaches the leaves of a small tree.

    The paper's depth is 1 for N < F**1.5 (31 endpoints at F=10): the root is the only relay,
    it has no siblings, and every leaf gets one copy whatever H is. Then this returns depth 2
    with the largest fan-out <= F that puts at least H+1 relays below the root, so each leaf
    gets H+1 copies from distinct parents; when N is too small for that (fewer than about
    (H+1)**2 leaves), the fan-out that gives the most parents. Otherwise (F, round(log_F N)).
    (The controller, whose endpoints come one by one, has its own form of this rule in
    `jasper.placement`: a full second level of the relays it has.)
    """
    depth = default_depth(leaves, fanout)
    if hedge == 0 or depth > 1:
        return fanout, depth
    best_fanout, best_parents = fanout, 1
    for f in range(fanout, 1, -1):
        leaf_relays = level_counts(leaves, fanout=f, depth=2)[1]
        parents = min(hedge + 1, leaf_relays)
        if parents > best_parents:
            best_fanout, best_parents = f, parents
        if parents == hedge + 1:
            break
    return (best_fanout, 2) if best_parents > 1 else (fanout, 1)


def _check_counts(leaves: int, fanout: int) -> None:
    if leaves < 1:
        raise ValueError(f"leaves must be >= 1, got {leaves}")
    if fanout < 2:
        raise ValueError(f"fanout must be >= 2, got {fanout}")


def integer_root_ceil(n: int, depth: int) -> int:
    """Smallest f with f**depth >= n."""
    f = max(1, round(math.pow(n, 1.0 / depth)))
    while f**depth < n:
        f += 1
    while f > 1 and (f - 1) ** depth >= n:
        f -= 1
    return f


def level_fanout(leaves: int, *, fanout: int, depth: int) -> int:
    """The fan-out every level is built with: F, or the smallest f with f**D >= N when F**D
    does not cover N (so that the root is one relay)."""
    return max(fanout, integer_root_ceil(leaves, depth))


def level_counts(leaves: int, *, fanout: int, depth: int) -> tuple[int, ...]:
    """Nodes per level of `tree_shape(leaves, fanout=fanout, depth=depth)`, root first and
    the leaves last (length depth + 1). Filled from the bottom: level D-1 has ceil(N/f)
    relays, each level above ceil(count below / f), so counts[0] == 1."""
    per_level = level_fanout(leaves, fanout=fanout, depth=depth)
    counts = [leaves]
    for _ in range(depth):
        counts.append(-(-counts[-1] // per_level))
    counts.reverse()
    return tuple(counts)


def _spread(children: int, parents: int) -> list[range]:
    """Split child indices 0..children-1 into `parents` contiguous blocks differing by <= 1."""
    return [range(p * children // parents, (p + 1) * children // parents) for p in range(parents)]


def hedge_siblings(group: Sequence[str], member: str, hedge: int, *, step: int) -> tuple[str, ...]:
    """The sibling-hedging rule: who `member` of a sibling group hedges for, or who hedges
    for it. step=+1: the siblings whose children `member` also feeds, in send order (i+1,
    i+2, .. cyclically); step=-1: the siblings that feed `member`'s children, nearest first
    (i-1, i-2, ..), which is also the order in which their copies are queued behind those
    senders' own children. At most H of them, and never the member itself, so a group of
    s relays gives min(H+1, s) distinct parents."""
    pos = group.index(member)
    reach = min(hedge, len(group) - 1)
    return tuple(group[(pos + step * k) % len(group)] for k in range(1, reach + 1))


def level_tables(
    groups: Iterable[Sequence[str]], own: Mapping[str, Sequence[str]], hedge: int
) -> tuple[dict[str, tuple[Forward, ...]], dict[str, tuple[str, ...]]]:
    """Forwarding tables of one relay level and the parents of the nodes one level below.

    `groups` are the level's sibling groups (the own children of each relay one level up, or
    the root alone); `own[r]` are relay r's own children in order. A relay sends to its own
    children first, then to the children of the siblings it hedges for; a child's parents
    are its own relay first, then the siblings hedging for it (`hedge_siblings`).
    """
    forwarding: dict[str, tuple[Forward, ...]] = {}
    parents: dict[str, tuple[str, ...]] = {}
    for group in groups:
        for relay in group:
            table = [Forward(c, False) for c in own[relay]]
            for sibling in hedge_siblings(group, relay, hedge, step=1):
                table.extend(Forward(c, True) for c in own[sibling])
            forwarding[relay] = tuple(table)
            hedgers = hedge_siblings(group, relay, hedge, step=-1)
            for c in own[relay]:
                parents[c] = (relay, *hedgers)
    return forwarding, parents


@dataclass(frozen=True)
class Shape:
    """Relay levels of a tree, without its leaves: the one model of a plan's relays.

    A `TreePlan` is a Shape with leaves "e0".."e{N-1}" spread evenly over its last level; the
    controller's `jasper.placement.Placement` is a Shape with VMs in its slots and endpoints
    attached one by one. Both take their forwarding tables from `level_tables`.
    """

    fanout: int
    """Own children per relay (the last level may take more under incremental growth)."""
    hedge: int
    """Sibling hedging H."""
    levels: tuple[tuple[str, ...], ...]
    """Relay slot names per level ("r<level>.<i>"); empty when the publisher feeds leaves."""
    inner: Mapping[str, tuple[Forward, ...]]
    """Forwarding between relay slots, for every level but the last."""
    groups: Mapping[str, tuple[str, ...]]
    """Last-level slot -> its sibling group in order (the slot itself included)."""

    @property
    def leaf_slots(self) -> tuple[str, ...]:
        return self.levels[-1] if self.levels else ()

    def hedgers(self, slot: str) -> tuple[str, ...]:
        """Siblings that send hedge copies of `slot`'s leaves, nearest first (i-1, i-2..)."""
        return hedge_siblings(self.groups[slot], slot, self.hedge, step=-1)

    def hedged(self, slot: str) -> tuple[str, ...]:
        """Siblings whose leaves `slot` also feeds, in send order (i+1, i+2..)."""
        return hedge_siblings(self.groups[slot], slot, self.hedge, step=1)

    def sibling_groups(self) -> tuple[tuple[str, ...], ...]:
        """The last level's sibling groups, in level order."""
        return tuple(dict.fromkeys(self.groups[s] for s in self.leaf_slots))

    def leaf_tables(self, leaves: Mapping[str, Sequence[str]]) -> dict[str, tuple[Forward, ...]]:
        """Forwarding tables of the last level when slot s holds the leaves `leaves[s]`."""
        return level_tables(self.sibling_groups(), leaves, self.hedge)[0]

    def parents_per_leaf(self) -> int:
        """Distinct parents every leaf gets (copies over equal-length paths): the smallest
        sibling group of the last level, capped at H+1; 1 with no relay at all."""
        if not self.levels:
            return 1
        return min(min(self.hedge + 1, len(g)) for g in self.sibling_groups())


def build_shape(leaves: int, *, fanout: int, hedge: int, depth: int) -> Shape:
    """Relay levels of `tree_shape(leaves, fanout=fanout, hedge=hedge, depth=depth)`.

    Only the relays are built (no graph, no leaves), so a 10,000-endpoint plan costs about
    as much as its 1,111 relays. Depth 0 is the empty shape (the publisher feeds leaves).
    """
    return _relay_levels(leaves, fanout=fanout, hedge=hedge, depth=depth)[0]


def _relay_levels(
    leaves: int, *, fanout: int, hedge: int, depth: int
) -> tuple[Shape, dict[str, tuple[str, ...]], tuple[int, ...]]:
    """(shape, parents of every relay, most own children per relay level)."""
    if depth <= 0:
        return Shape(fanout=fanout, hedge=hedge, levels=(), inner={}, groups={}), {}, ()
    leaves = max(1, leaves)
    per_level = level_fanout(leaves, fanout=fanout, depth=depth)
    counts = level_counts(leaves, fanout=fanout, depth=depth)
    levels = tuple(
        tuple(relay_name(level, i) for i in range(counts[level])) for level in range(depth)
    )
    root = levels[0][0]
    inner: dict[str, tuple[Forward, ...]] = {}
    parents: dict[str, tuple[str, ...]] = {root: ()}
    groups: list[tuple[str, ...]] = [(root,)]
    fanouts = []
    for level in range(depth):
        here = levels[level]
        blocks = _spread(counts[level + 1], counts[level])
        fanouts.append(max(len(b) for b in blocks))
        if level == depth - 1:
            break
        below = levels[level + 1]
        own = {r: tuple(below[c] for c in block) for r, block in zip(here, blocks, strict=True)}
        fwd, ps = level_tables(groups, own, hedge)
        inner.update(fwd)
        parents.update(ps)
        groups = [own[r] for r in here]
    group_of = {slot: group for group in groups for slot in group}
    shape = Shape(fanout=per_level, hedge=hedge, levels=levels, inner=inner, groups=group_of)
    return shape, parents, tuple(fanouts)


def tree_shape(
    leaves: int,
    *,
    fanout: int = DEFAULT_FANOUT,
    hedge: int = DEFAULT_HEDGE,
    depth: int | None = None,
) -> TreePlan:
    """Build the relay tree for `leaves` endpoints.

    Shape: the per-level fan-out is F, raised to the smallest f with f**D >= N when F**D does
    not cover N (depth given explicitly, or the rounding of the default depth). Levels are
    filled from the bottom: level D-1 has ceil(N/f) relays, each level above ceil(count
    below / f), so the root is the one relay that may have fewer children (N=1000, D=4, F=6
    gives 1, 5, 28, 167 relays). Children are spread evenly over the relays of a level
    (contiguous blocks whose sizes differ by at most one).

    Hedging: siblings are the relays with the same parent, numbered 0..s-1 in that group.
    Relay i also sends to the children of siblings i+1..i+H (cyclically), after its own
    children, so each node below level 1 gets copies from H+1 distinct parents, all one
    level up (equal-length paths); with a sibling group of s < H+1 relays it gets s copies.
    The root has no siblings, so its children (level 1) get a single copy. Each relay sends
    (H+1)*F copies per message when all its siblings have F children.

    Pure and deterministic: the same arguments always give the same plan.
    """
    _check_counts(leaves, fanout)
    if hedge < 0:
        raise ValueError(f"hedge must be >= 0, got {hedge}")
    if depth is None:
        depth = default_depth(leaves, fanout)
    elif depth < 1 or depth > MAX_DEPTH:
        raise ValueError(f"depth must be in 1..{MAX_DEPTH}, got {depth}")

    import networkx as nx

    shape, parents, level_fanouts = _relay_levels(leaves, fanout=fanout, hedge=hedge, depth=depth)
    slots = shape.leaf_slots
    held = {
        slot: tuple(leaf_name(i) for i in block)
        for slot, block in zip(slots, _spread(leaves, len(slots)), strict=True)
    }
    forwarding = {**shape.inner, **shape.leaf_tables(held)}
    for slot, names in held.items():
        hedgers = shape.hedgers(slot)
        for leaf in names:
            parents[leaf] = (slot, *hedgers)

    graph = nx.DiGraph()
    graph.add_nodes_from(
        (r, {"level": level}) for level, names in enumerate(shape.levels) for r in names
    )
    graph.add_nodes_from((leaf_name(i), {"level": depth}) for i in range(leaves))
    graph.add_edges_from(
        (relay, fwd.target, {"hedge": fwd.hedge})
        for relay, sends in forwarding.items()
        for fwd in sends
    )

    return TreePlan(
        leaves=leaves,
        fanout=fanout,
        hedge=hedge,
        depth=depth,
        levels=shape.levels,
        forwarding=MappingProxyType(forwarding),
        parents=MappingProxyType(parents),
        graph=graph,
        level_fanouts=level_fanouts,
    )
