"""Placement of relay VMs and MP endpoints onto a tree shape, using measured link latencies."""

from __future__ import annotations

import heapq
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from jasper.tree import (
    DEFAULT_FANOUT,
    DEFAULT_HEDGE,
    Forward,
    PlanTables,
    Shape,
    build_shape,
    default_depth,
    level_counts,
)

# Cost model of the paper (c5.2xlarge): a level costs about 30 µs, each copy a relay sends
# before the one in question costs about 2.7 µs more.
HOP_NS = 30_000
"""Latency of one hop (link plus relay processing) when nothing was measured, in ns."""
SEND_NS = 2_700
"""Cost of one send at a relay, in ns; the k-th copy leaves k*SEND_NS after the first."""

ROOT_SLOT = "r0.0"


@dataclass(frozen=True)
class LinkStats:
    """Summary of the one-way delay measured on one directed link."""

    owd_ns: int
    """Median one-way delay, in nanoseconds."""
    jitter_ns: int
    """Mean absolute difference of successive one-way delays, in nanoseconds."""
    samples: int = 1
    """Probes the summary is based on."""


@dataclass(frozen=True)
class LatencyMatrix:
    """Measured links between nodes (relays, receiver hosts, publishers) by name."""

    links: Mapping[tuple[str, str], LinkStats] = field(default_factory=dict)
    """(source, destination) -> stats; directed, missing when never measured."""

    def owd_ns(self, src: str, dst: str, default: int = HOP_NS) -> int:
        """Measured one-way delay src -> dst, or `default` when that link was never probed."""
        stats = self.links.get((src, dst))
        return default if stats is None else stats.owd_ns

    def node_scores(self, nodes: Iterable[str]) -> dict[str, float | None]:
        """Per node: median over its measured links (both directions) of owd + 2 * jitter.

        Both directions count because a lemon VM (noisy neighbour, bad NIC queue) slows what
        it sends and what it receives alike. None when no link of the node was measured.
        """
        wanted = set(nodes)
        per_node: dict[str, list[float]] = {n: [] for n in wanted}
        for (src, dst), s in self.links.items():
            cost = float(s.owd_ns + 2 * s.jitter_ns)
            if src in wanted:
                per_node[src].append(cost)
            if dst in wanted:
                per_node[dst].append(cost)
        return {n: (statistics.median(c) if c else None) for n, c in per_node.items()}


@dataclass(frozen=True)
class RelayRanking:
    """Relays ordered for placement: best first, lemons set apart."""

    ranked: tuple[str, ...]
    """Relays fit for relay roles, lowest latency and jitter first."""
    lemons: tuple[str, ...]
    """Outliers kept out of relay roles."""
    scores: Mapping[str, float]
    """Score used for the ranking (unmeasured relays get the median), in ns."""


def rank_relays(
    relays: Sequence[str],
    matrix: LatencyMatrix,
    *,
    lemon_factor: float = 2.0,
    lemon_floor_ns: int = 20_000,
) -> RelayRanking:
    """Rank relays by measured latency and jitter; a relay whose score exceeds both
    `lemon_factor` times the median score and the median plus `lemon_floor_ns` is a lemon.

    The absolute floor keeps noise on fast links (a few µs) from branding healthy VMs. If every
    relay would be a lemon none is, since a tree needs relays. Ties keep the given order.
    """
    raw = matrix.node_scores(relays)
    measured = [v for v in raw.values() if v is not None]
    median = statistics.median(measured) if measured else 0.0
    scores = {r: (raw[r] if raw[r] is not None else median) for r in relays}
    order = {r: i for i, r in enumerate(relays)}
    limit = max(median * lemon_factor, median + lemon_floor_ns)
    lemons = tuple(r for r in relays if measured and (scores[r] or 0.0) > limit)
    good = [r for r in relays if r not in set(lemons)] or list(relays)
    if len(good) == len(relays):
        lemons = ()
    good.sort(key=lambda r: (scores[r], order[r]))
    return RelayRanking(
        ranked=tuple(good),
        lemons=lemons,
        scores={r: float(v) for r, v in scores.items() if v is not None},
    )


@dataclass(frozen=True)
class Endpoint:
    """One MP endpoint to place: a leaf of the tree."""

    key: str
    """Endpoint name in the topology, unique within a stream."""
    host: str
    """Receiver host (node name) the endpoint lives on; used for latency lookups."""


@dataclass
class Placement:
    """A placed tree for one stream: which VM fills each relay slot and where each endpoint
    hangs. Mutable only through `attach`/`detach`, which never move an existing endpoint."""

    shape: Shape
    slot_node: dict[str, str]
    """Relay slot -> relay node name."""
    publisher: str
    """Publisher node name; it sends to the root slot, or to the leaves when there is none."""
    epoch: int = 1
    """Plan epoch stamped into the header; a full re-plan takes a larger one."""
    children: dict[str, list[str]] = field(default_factory=dict)
    """Leaf slot (or the publisher when there is no relay) -> endpoint keys in attach order."""
    where: dict[str, str] = field(default_factory=dict)
    """Endpoint key -> leaf slot."""
    hosts: dict[str, str] = field(default_factory=dict)
    """Endpoint key -> receiver host."""

    _heap: list[tuple[int, int, str]] = field(default_factory=list, repr=False, compare=False)
    """(load, rank, slot) entries; stale ones (load changed since) are skipped lazily."""
    _rank: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for i, s in enumerate(self.leaf_slots()):
            self.children.setdefault(s, [])
            self._rank[s] = i

    def _push(self, slot: str) -> None:
        if self._heap:
            heapq.heappush(self._heap, (len(self.children[slot]), self._rank[slot], slot))

    def leaf_slots(self) -> tuple[str, ...]:
        return self.shape.leaf_slots or (self.publisher,)

    def node_of(self, slot: str) -> str:
        """Node filling a slot (the publisher stands for itself)."""
        return self.publisher if slot == self.publisher else self.slot_node[slot]

    def load(self, slot: str) -> int:
        return len(self.children[slot])

    def least_loaded(self) -> str:
        """Leaf slot with fewest endpoints; ties go to the earlier (better ranked) slot.

        O(log k) with a lazy heap, so an attach stays far below 1 ms at 1,000 leaf relays.
        """
        heap = self._heap
        if not heap:
            heap.extend((len(self.children[s]), self._rank[s], s) for s in self.leaf_slots())
            heapq.heapify(heap)
        while heap[0][0] != len(self.children[heap[0][2]]):
            heapq.heappop(heap)
        return heap[0][2]

    def attach(self, ep: Endpoint, slot: str | None = None) -> str:
        """Hang `ep` under the least-loaded leaf relay (or `slot`); nobody else moves."""
        if ep.key in self.where:
            return self.where[ep.key]
        chosen = slot if slot is not None else self.least_loaded()
        self.children[chosen].append(ep.key)
        self.where[ep.key] = chosen
        self.hosts[ep.key] = ep.host
        self._push(chosen)
        return chosen

    def detach(self, key: str) -> None:
        slot = self.where.pop(key, None)
        if slot is not None:
            self.children[slot].remove(key)
            self.hosts.pop(key, None)
            self._push(slot)

    def endpoints(self) -> list[str]:
        return [k for s in self.leaf_slots() for k in self.children[s]]

    def parents(self, key: str) -> tuple[str, ...]:
        """Nodes that send `key` a copy: own relay first, then the hedging siblings."""
        slot = self.where[key]
        if not self.shape.levels:
            return (self.publisher,)
        return tuple(self.node_of(s) for s in (slot, *self.shape.hedgers(slot)))

    def forwarding(self) -> dict[str, tuple[Forward, ...]]:
        """Node -> targets in send order (own children first, then hedge copies), by node
        name; includes the publisher."""
        out: dict[str, tuple[Forward, ...]] = {}
        if not self.shape.levels:
            out[self.publisher] = tuple(Forward(k, False) for k in self.children[self.publisher])
            return out
        out[self.publisher] = (Forward(self.node_of(ROOT_SLOT), False),)
        for slot, fwd in self.shape.inner.items():
            out[self.node_of(slot)] = tuple(Forward(self.node_of(f.target), f.hedge) for f in fwd)
        for slot, table in self.shape.leaf_tables(self.children).items():
            out[self.node_of(slot)] = table
        return out

    def parents_min(self) -> int:
        """Fewest distinct parents of any endpoint (copies over equal-length paths); what the
        shape promises (`Shape.parents_per_leaf`) while no endpoint is attached."""
        if not self.shape.levels:
            return 1
        used = [s for s in self.shape.leaf_slots if self.children[s]]
        if not used:
            return self.shape.parents_per_leaf()
        return min(len({s, *self.shape.hedgers(s)}) for s in used)

    def tables(self) -> PlanTables:
        """The plan's forwarding (by node name) and every endpoint's parents, for
        `jasper.layout.topology_of`."""
        fwd = self.forwarding()
        return PlanTables(
            publisher=self.publisher,
            publisher_targets=fwd.pop(self.publisher),
            relays=tuple((node, fwd.get(node, ())) for node in self.relay_nodes()),
            endpoints=tuple((key, self.parents(key)) for key in self.endpoints()),
        )

    def relay_nodes(self) -> tuple[str, ...]:
        return tuple(self.slot_node[s] for level in self.shape.levels for s in level)

    def to_dict(self) -> dict[str, object]:
        """Everything needed to rebuild this placement exactly (see `from_dict`)."""
        return {
            "epoch": self.epoch,
            "publisher": self.publisher,
            "fanout": self.shape.fanout,
            "hedge": self.shape.hedge,
            "levels": [list(level) for level in self.shape.levels],
            "inner": {s: [[f.target, f.hedge] for f in fwd] for s, fwd in self.shape.inner.items()},
            "groups": {s: list(g) for s, g in self.shape.groups.items()},
            "slot_node": dict(self.slot_node),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, object]) -> Placement:
        """Rebuild the relay part saved by `to_dict`; endpoints are attached afterwards."""
        levels = tuple(tuple(level) for level in doc["levels"])  # type: ignore[attr-defined]
        inner = {
            s: tuple(Forward(str(t), bool(h)) for t, h in fwd)
            for s, fwd in doc["inner"].items()  # type: ignore[attr-defined]
        }
        groups = {s: tuple(g) for s, g in doc["groups"].items()}  # type: ignore[attr-defined]
        shape = Shape(
            fanout=int(doc["fanout"]),  # type: ignore[call-overload]
            hedge=int(doc["hedge"]),  # type: ignore[call-overload]
            levels=levels,
            inner=inner,
            groups=groups,
        )
        return cls(
            shape=shape,
            slot_node=dict(doc["slot_node"]),  # type: ignore[call-overload]
            publisher=str(doc["publisher"]),
            epoch=int(doc["epoch"]),  # type: ignore[call-overload]
        )


def _relays_in(leaves: int, fanout: int, depth: int) -> int:
    """Relays of a tree of `leaves` at `depth` (see `jasper.tree.level_counts`)."""
    return sum(level_counts(max(1, leaves), fanout=fanout, depth=depth)[:-1])


def choose_depth(
    leaves: int, relays: int, *, fanout: int = DEFAULT_FANOUT, depth: int | None = None
) -> int:
    """The paper's depth round(log_F N), reduced until the tree needs at most `relays` relays.

    With fewer relays than the ideal tree needs, a shallower tree with a larger fan-out costs
    more per hop but uses only VMs we have. 0 means no relay at all (publisher sends direct).
    An explicit `depth` replaces the paper's (e.g. 2 on a small demo, for hedged copies).
    """
    if relays <= 0:
        return 0
    if depth is None:
        depth = default_depth(max(1, leaves), fanout)
    while depth > 1 and _relays_in(leaves, fanout, depth) > relays:
        depth -= 1
    return depth


def _planned_leaves(endpoints: int, relays: int, *, fanout: int, depth: int | None) -> int:
    """Leaves to shape the tree for. With an explicit depth, a tree full at that depth
    (F**D leaves, if the relays suffice), so that the first subscribers already spread over
    sibling groups and get H+1 copies, and later ones attach without a re-plan."""
    n = max(1, endpoints)
    full: int = fanout**depth if depth is not None else 0
    if depth is None or full > 100_000:
        return n
    planned = max(n, full)
    while planned > n and _relays_in(planned, fanout, depth) > relays:
        planned = max(n, planned // 2)
    return planned


def plan_shape(
    endpoints: int,
    relays: int,
    *,
    fanout: int = DEFAULT_FANOUT,
    hedge: int = DEFAULT_HEDGE,
    depth: int | None = None,
) -> tuple[int, int]:
    """(leaves to shape the tree for, depth) of a full plan of `endpoints` over `relays`.

    Small trees keep hedging: where the depth comes out as 1 (few endpoints, or too few
    relays for a second level of the paper's fan-out) the root would be the only relay above
    the endpoints and every endpoint would get one copy whatever H is. With H > 0 and at
    least 3 relays the plan is instead a root over a full second level of min(relays - 1, F)
    siblings, so each endpoint gets min(H+1, that) copies from distinct parents; the
    endpoints spread over that level whatever their number. A stream that asks for depth 1
    gets it. (The lab's static trees apply the same idea through `jasper.tree.hedged_shape`,
    where N is known up front; here subscribers come one by one, so the level is planned
    full.)
    """
    planned = _planned_leaves(endpoints, relays, fanout=fanout, depth=depth)
    chosen = choose_depth(planned, relays, fanout=fanout, depth=depth)
    if chosen == 1 and hedge > 0 and depth != 1 and relays >= 3:
        return min(relays - 1, fanout) * fanout, 2
    return planned, chosen


def fresh_shape(
    endpoints: int,
    relays: int,
    *,
    fanout: int = DEFAULT_FANOUT,
    hedge: int = DEFAULT_HEDGE,
    depth: int | None = None,
) -> Shape:
    """The relay levels a full plan of `endpoints` over `relays` would have (lemons aside):
    how many relays it uses, and how many distinct parents its endpoints get
    (`Shape.parents_per_leaf`), without placing anything."""
    if relays <= 0:
        return build_shape(0, fanout=fanout, hedge=hedge, depth=0)
    planned, d = plan_shape(endpoints, relays, fanout=fanout, hedge=hedge, depth=depth)
    return build_shape(planned, fanout=fanout, hedge=hedge, depth=d)


def hedging_note(placement: Placement, *, relays: int, depth: int | None = None) -> str:
    """Empty when every endpoint of `placement` gets H+1 copies from distinct parents (or
    H = 0); else one line saying that hedging is off or reduced, and why. `relays`: the
    relays that were usable for the plan; `depth`: the depth the stream asks for, if any."""
    shape = placement.shape
    h = shape.hedge
    got = placement.parents_min()
    if h == 0 or got >= h + 1:
        return ""
    state = "off" if got <= 1 else "reduced"
    head = f"hedging {state}: each endpoint gets {got} distinct parent(s), not H+1={h + 1}"
    if not shape.levels:
        why = "no relay is alive, so the publisher sends to every endpoint"
    elif depth == 1:
        why = "the stream asks for depth 1 (one relay above the endpoints)"
    elif relays < h + 2:
        why = (
            f"{relays} relay(s) usable; H={h} needs {h + 2} "
            f"(a root over H+1={h + 1} siblings above the endpoints)"
        )
    elif shape.fanout < h + 1:
        why = f"fan-out {shape.fanout} makes sibling groups of at most {shape.fanout} relays"
    else:
        smallest = min(len(g) for g in shape.sibling_groups())
        why = (
            f"the smallest sibling group above the endpoints has {smallest} relay(s) "
            f"(fan-out {shape.fanout}, {relays} usable)"
        )
    return f"{head}: {why}"


def full_plan(
    endpoints: Sequence[Endpoint],
    relays: Sequence[str],
    *,
    publisher: str,
    matrix: LatencyMatrix | None = None,
    fanout: int = DEFAULT_FANOUT,
    hedge: int = DEFAULT_HEDGE,
    epoch: int = 1,
    lemon_factor: float = 2.0,
    depth: int | None = None,
) -> Placement:
    """Plan a tree from scratch (its shape from `plan_shape`).

    Relays are ranked by measured latency and jitter: the best fill the upper levels (a slow
    VM near the root delays every endpoint, one at the last level only its own leaves), lemons
    are left out. Endpoints are grouped by host and spread evenly (loads differ by at most
    one) over the last-level relays.

    When leaving the lemons out forces a smaller tree (a shallower one, or one whose
    endpoints get fewer distinct parents), the plan with the lemons at the last level, where
    hedged copies from healthy siblings cover for them, is also built. The plan whose
    endpoints get more distinct parents (up to H+1) wins: the cost model below has no
    latency variance, so it cannot see what hedging is for; between equals, the one with
    the lower predicted OML.
    """
    matrix = matrix or LatencyMatrix()
    ranking = rank_relays(relays, matrix, lemon_factor=lemon_factor)
    candidates = [_plan_with(endpoints, ranking.ranked, publisher, fanout, hedge, epoch, depth)]
    if ranking.lemons:
        least_bad = sorted(ranking.lemons, key=lambda r: ranking.scores.get(r, 0.0))
        everyone = len(ranking.ranked) + len(least_bad)
        n = len(endpoints)
        with_lemons = fresh_shape(n, everyone, fanout=fanout, hedge=hedge, depth=depth)
        without = candidates[0].shape
        deeper = len(with_lemons.levels) > len(without.levels)
        if deeper or with_lemons.parents_per_leaf() > without.parents_per_leaf():
            candidates.append(
                _plan_with(
                    endpoints, ranking.ranked, publisher, fanout, hedge, epoch, depth, least_bad
                )
            )
    if len(candidates) == 1:
        return candidates[0]
    return min(
        candidates, key=lambda p: (-p.shape.parents_per_leaf(), predict_oml(p, matrix).oml_ns)
    )


def _plan_with(
    endpoints: Sequence[Endpoint],
    ranked: Sequence[str],
    publisher: str,
    fanout: int,
    hedge: int,
    epoch: int,
    depth: int | None,
    lemons: Sequence[str] = (),
) -> Placement:
    """Place `ranked` relays best first, level by level; `lemons` only fill last-level slots
    the good relays cannot, one per sibling group, so their siblings' hedge copies cover
    for them."""
    everyone = (*ranked, *lemons)
    planned, depth = plan_shape(
        len(endpoints), len(everyone), fanout=fanout, hedge=hedge, depth=depth
    )
    shape = build_shape(planned, fanout=fanout, hedge=hedge, depth=depth)
    slots = [s for level in shape.levels for s in level]
    spare = max(0, len(slots) - len(ranked))
    lemon_slots: list[str] = []
    if spare and shape.levels:
        groups = list(dict.fromkeys(shape.groups[s] for s in shape.leaf_slots))
        depth_in_group = 0
        while len(lemon_slots) < spare and depth_in_group < max(len(g) for g in groups):
            for group in reversed(groups):
                # Every third member from the end: a lemon's hedgers (i-1, i-2) stay healthy
                # as long as a group holds few lemons.
                pos = len(group) - 1 - 3 * depth_in_group
                if pos >= 0 and len(lemon_slots) < spare and group[pos] not in lemon_slots:
                    lemon_slots.append(group[pos])
            depth_in_group += 1
        for s in reversed(slots):
            if len(lemon_slots) >= spare:
                break
            if s not in lemon_slots:
                lemon_slots.append(s)
    taken = set(lemon_slots)
    slot_node = dict(zip([s for s in slots if s not in taken], ranked, strict=False))
    slot_node.update(zip(lemon_slots, lemons, strict=False))
    placement = Placement(shape=shape, slot_node=slot_node, publisher=publisher, epoch=epoch)
    _spread_endpoints(placement, endpoints)
    return placement


def _spread_endpoints(placement: Placement, endpoints: Sequence[Endpoint]) -> None:
    leaf_slots = placement.leaf_slots()
    ordered = sorted(endpoints, key=lambda e: (e.host, e.key))
    k, n = len(leaf_slots), len(ordered)
    for i, slot in enumerate(leaf_slots):
        for ep in ordered[i * n // k : (i + 1) * n // k]:
            placement.attach(ep, slot)


def random_plan(
    endpoints: Sequence[Endpoint],
    relays: Sequence[str],
    *,
    publisher: str,
    rng: random.Random,
    fanout: int = DEFAULT_FANOUT,
    hedge: int = DEFAULT_HEDGE,
) -> Placement:
    """Baseline: the same shape as `full_plan`, relays (lemons included) and endpoints
    shuffled; what a placement blind to measurements would do."""
    depth = choose_depth(len(endpoints), len(relays), fanout=fanout)
    shape = build_shape(len(endpoints), fanout=fanout, hedge=hedge, depth=depth)
    slots = [s for level in shape.levels for s in level]
    pool = list(relays)
    rng.shuffle(pool)
    placement = Placement(
        shape=shape, slot_node=dict(zip(slots, pool, strict=False)), publisher=publisher
    )
    eps = list(endpoints)
    rng.shuffle(eps)
    leaf_slots = placement.leaf_slots()
    k, n = len(leaf_slots), len(eps)
    for i, slot in enumerate(leaf_slots):
        for ep in eps[i * n // k : (i + 1) * n // k]:
            placement.attach(ep, slot)
    return placement


@dataclass(frozen=True)
class OmlPrediction:
    """Predicted delivery times of one placement under the cost model."""

    oml_ns: int
    """Overall multicast latency: first copy at the slowest endpoint, in ns."""
    median_ns: int
    """Median over endpoints of the first copy's arrival, in ns."""
    arrival_ns: Mapping[str, int]
    """Endpoint key -> first copy's arrival after the publisher's send, in ns."""


def predict_oml(
    placement: Placement,
    matrix: LatencyMatrix | None = None,
    *,
    hop_ns: int = HOP_NS,
    send_ns: int = SEND_NS,
) -> OmlPrediction:
    """Arrival of the first of each endpoint's copies, hop by hop.

    A copy leaves a node `send_ns` times its position in the send order after the node got
    its own first copy, and takes the measured one-way delay of the link (`hop_ns` when the
    link was never measured). The same model as `jasper.simulate` without the random draws.
    """
    matrix = matrix or LatencyMatrix()
    links = matrix.links
    hosts = placement.hosts
    pub = placement.publisher
    arrival: dict[str, int] = {}
    owd_cache: dict[tuple[str, str], int] = {}

    def owd(src: str, dst: str) -> int:
        key = (src, dst)
        v = owd_cache.get(key)
        if v is None:
            stats = links.get(key)
            v = owd_cache[key] = hop_ns if stats is None else stats.owd_ns
        return v

    def send(src_node: str, start: int, targets: list[tuple[str, str]]) -> None:
        # targets: (target key, node the link goes to), in send order.
        for pos, (target, dst) in enumerate(targets, 1):
            t = start + pos * send_ns + owd(src_node, dst)
            if t < arrival.get(target, t + 1):
                arrival[target] = t

    shape = placement.shape
    node_of = placement.node_of
    # Level by level from the publisher: a relay of level l hears only from level l-1, so
    # its first arrival is final before it sends. Works on slots to skip building tables.
    if not shape.levels:
        send(pub, 0, [(k, hosts[k]) for k in placement.children[pub]])
    else:
        send(pub, 0, [(ROOT_SLOT, node_of(ROOT_SLOT))])
        for level in shape.levels[:-1]:
            for slot in level:
                targets = [(f.target, node_of(f.target)) for f in shape.inner[slot]]
                send(node_of(slot), arrival[slot], targets)
        children = placement.children
        for slot in shape.leaf_slots:
            if slot not in arrival:
                continue
            order = [(k, hosts[k]) for k in children[slot]]
            for sibling in shape.hedged(slot):
                order.extend((k, hosts[k]) for k in children[sibling])
            send(node_of(slot), arrival[slot], order)
    eps = {k: arrival[k] for k in placement.where if k in arrival}
    times = sorted(eps.values())
    return OmlPrediction(
        oml_ns=times[-1] if times else 0,
        median_ns=times[len(times) // 2] if times else 0,
        arrival_ns=eps,
    )
