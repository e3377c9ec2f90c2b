"""Vectorized simulator of multicast over relay trees: cost model, baselines, fairness figures.

Everything is in microseconds as float64 (the rest of the core uses integer nanoseconds; a
simulator of model latencies has no need for that precision). Time 0 is the moment the
sender (the root relay, or the publisher for direct unicast) has the message and stamps its
send time. Pure and seeded: the same Scenario always gives the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from jasper.latency_model import FloatArray, LinkModel, UniformLatency
from jasper.metrics import wilson_interval
from jasper.tree import TreePlan, leaf_name, parse_node, tree_shape

IntArray = npt.NDArray[np.intp]


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Host-side cost of relaying, from the paper's measurements on c5.2xlarge."""

    level_processing_us: float = 30.0
    """Time from a relay's receipt of the first copy until it starts sending, in µs."""
    per_send_us: float = 2.7
    """Time per copy sent back to back, in µs: the k-th copy (k = 1, 2, ...) leaves
    k * per_send_us after the relay starts sending."""

    def __post_init__(self) -> None:
        if self.level_processing_us < 0 or self.per_send_us < 0:
            raise ValueError("cost model times must be >= 0")


@dataclass(frozen=True, kw_only=True)
class HoldPolicy:
    """Jasper's release deadline: send time + max over endpoints of an OWD percentile."""

    percentile: float = 97.0
    """Percentile of each endpoint's one-way delays over the previous window (p97)."""
    window_messages: int = 100
    """Messages per window; the first window is warm-up (no estimate yet) and not scored."""
    extra_hold_us: float = 0.0
    """Extra hold in µs added on top of the max-reduced percentile."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {self.percentile}")
        if self.window_messages < 1:
            raise ValueError(f"window_messages must be >= 1, got {self.window_messages}")
        if self.extra_hold_us < 0:
            raise ValueError(f"extra_hold_us must be >= 0, got {self.extra_hold_us}")


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One simulated deployment: receivers, tree shape, models, messages, seed."""

    receivers: int = 1000
    """Number of endpoints N (leaves of the tree)."""
    fanout: int = 10
    """Tree fan-out F."""
    hedge: int = 2
    """Sibling hedging H of the Jasper tree (the "tree H=0" baseline uses 0)."""
    depth: int | None = None
    """Tree depth D; None for the paper's round(log_F N)."""
    messages: int = 1000
    """Messages simulated, warm-up window included."""
    seed: int = 1
    """Seed of every random draw."""
    tau_us: float = 0.0
    """Fairness threshold: a message is fair when no endpoint is late and DWS <= tau_us. The
    simulator releases exactly at the deadline, so 0 is meaningful here (docs/metrics.md)."""
    interval_us: float | None = None
    """Time between messages at the publisher in µs (1e6 / rate); with it, a message waits
    while a relay is still sending the previous one. None: messages never queue."""
    cost: CostModel = field(default_factory=CostModel)
    """Relay processing and per-copy send times."""
    link: LinkModel = field(default_factory=LinkModel)
    """Link latency distribution and lemon VMs."""
    hold: HoldPolicy = field(default_factory=HoldPolicy)
    """How Jasper picks the release deadline."""

    def __post_init__(self) -> None:
        if self.receivers < 1:
            raise ValueError(f"receivers must be >= 1, got {self.receivers}")
        if self.messages <= self.hold.window_messages:
            raise ValueError(
                f"messages ({self.messages}) must exceed the warm-up window "
                f"({self.hold.window_messages})"
            )
        if self.tau_us < 0:
            raise ValueError(f"tau_us must be >= 0, got {self.tau_us}")
        if self.interval_us is not None and not self.interval_us > 0:
            raise ValueError(f"interval_us must be > 0, got {self.interval_us}")


@dataclass(frozen=True)
class CompiledTree:
    """A TreePlan as index arrays: for each level, every node's parents and send slots."""

    depth: int
    """Hops from root to leaf."""
    counts: tuple[int, ...]
    """Nodes per level, counts[0] == 1 (root) and counts[depth] == leaves."""
    parent_index: tuple[IntArray, ...]
    """parent_index[l][i, j]: index at level l of the j-th parent of node i at level l+1
    (padded with 0 where a node has fewer parents)."""
    send_slot: tuple[IntArray, ...]
    """send_slot[l][i, j]: position (1-based) of that copy in the parent's send order, 0 where
    padded."""

    def sends_per_relay(self, level: int) -> IntArray:
        """Copies each relay of `level` sends per message (own children plus hedges)."""
        valid = self.send_slot[level] > 0
        return np.bincount(self.parent_index[level][valid], minlength=self.counts[level])

    def offsets_us(self, cost: CostModel) -> tuple[FloatArray, ...]:
        """Departure of each copy after its parent's first arrival (inf where padded)."""
        out = []
        for slots in self.send_slot:
            off = cost.level_processing_us + slots * cost.per_send_us
            out.append(np.where(slots > 0, off, np.inf))
        return tuple(out)


def compile_tree(plan: TreePlan) -> CompiledTree:
    """Turn the plan's forwarding tables into arrays the simulator can vectorize over."""
    counts = (*(len(level) for level in plan.levels), plan.leaves)
    parent_index: list[IntArray] = []
    send_slot: list[IntArray] = []
    for level in range(plan.depth):
        n = counts[level + 1]
        width = max(len(plan.parents[_name(plan, level + 1, i)]) for i in range(n))
        idx = np.zeros((n, width), dtype=np.intp)
        slot = np.zeros((n, width), dtype=np.intp)
        for relay in plan.levels[level]:
            _, r = parse_node(relay)
            for k, fwd in enumerate(plan.forwarding[relay], start=1):
                _, c = parse_node(fwd.target)
                j = plan.parents[fwd.target].index(relay)
                idx[c, j] = r
                slot[c, j] = k
        parent_index.append(idx)
        send_slot.append(slot)
    return CompiledTree(plan.depth, counts, tuple(parent_index), tuple(send_slot))


def _name(plan: TreePlan, level: int, index: int) -> str:
    return plan.levels[level][index] if level < plan.depth else leaf_name(index)


def tree_first_arrivals(
    tree: CompiledTree,
    offsets_us: Sequence[FloatArray],
    link: LinkModel,
    biases_us: Sequence[FloatArray],
    rng: np.random.Generator,
    batch: int,
) -> FloatArray:
    """First-copy arrival time (µs after send) of `batch` messages at every leaf: (batch, N).

    A relay forwards on the first copy it gets and drops later ones, so a node's arrival is
    the minimum over its parents of (parent arrival + departure offset + link latency),
    plus the node's own lemon bias. Every copy draws its own link latency.
    """
    arrival: FloatArray = np.zeros((batch, 1))
    for level in range(tree.depth):
        cand = arrival[:, tree.parent_index[level]]
        cand += offsets_us[level]
        cand += link.body.sample(rng, cand.shape)
        arrival = cand.min(axis=2)
        arrival += biases_us[level + 1]
    return arrival


def unicast_tree(receivers: int) -> CompiledTree:
    """Direct unicast as a one-level "tree": the publisher sends N copies, e0 first."""
    return CompiledTree(
        depth=1,
        counts=(1, receivers),
        parent_index=(np.zeros((receivers, 1), dtype=np.intp),),
        send_slot=(np.arange(1, receivers + 1, dtype=np.intp).reshape(receivers, 1),),
    )


def unicast_arrivals(
    receivers: int,
    cost: CostModel,
    link: LinkModel,
    leaf_bias_us: FloatArray,
    rng: np.random.Generator,
    batch: int,
) -> FloatArray:
    """Direct unicast: the publisher sends N copies back to back, e0 first: (batch, N)."""
    tree = unicast_tree(receivers)
    biases = [np.zeros(1), leaf_bias_us]
    return tree_first_arrivals(tree, tree.offsets_us(cost), link, biases, rng, batch)


@dataclass(frozen=True)
class QueueState:
    """Where the senders' queues stand between two batches of messages."""

    busy_until_us: tuple[FloatArray, ...]
    """Per relay level, the absolute time (µs) each relay finishes sending the last message."""
    next_message: int
    """Index of the next message; message m is sent at m * interval_us."""

    @classmethod
    def idle(cls, tree: CompiledTree) -> QueueState:
        """Every relay idle before the first message."""
        return cls(tuple(np.full(c, -np.inf) for c in tree.counts[:-1]), 0)


def queued_first_arrivals(
    tree: CompiledTree,
    cost: CostModel,
    link: LinkModel,
    biases_us: Sequence[FloatArray],
    rng: np.random.Generator,
    batch: int,
    *,
    interval_us: float,
    state: QueueState,
) -> tuple[FloatArray, QueueState]:
    """Like `tree_first_arrivals`, but messages leave every interval_us and queue at relays.

    A relay is a single sender: it starts a message's copies at max(first arrival +
    level_processing_us, the end of its previous message's copies) and is then busy for
    (its copies) * per_send_us. Processing itself overlaps (it is latency, not sender time).
    Link draws are taken in the same order as `tree_first_arrivals`, so with a long interval
    the two agree. Returns first arrivals relative to each message's send time.
    """
    send_us = (state.next_message + np.arange(batch, dtype=np.float64)) * interval_us
    arrival: FloatArray = send_us[:, None].copy()
    step = np.arange(batch, dtype=np.float64)[:, None]
    busy_after: list[FloatArray] = []
    for level in range(tree.depth):
        ready = arrival + cost.level_processing_us
        busy_per_message = tree.sends_per_relay(level) * cost.per_send_us
        # Lindley recursion start[m] = max(ready[m], start[m-1] + busy), solved for all m at
        # once: start[m] - m*busy is the running max of ready[m] - m*busy.
        shifted = ready - step * busy_per_message
        shifted[0] = np.maximum(shifted[0], state.busy_until_us[level])
        start = np.maximum.accumulate(shifted, axis=0) + step * busy_per_message
        busy_after.append(start[-1] + busy_per_message)
        slots = tree.send_slot[level]
        depart = np.where(slots > 0, slots * cost.per_send_us, np.inf)
        cand = start[:, tree.parent_index[level]]
        cand += depart
        cand += link.body.sample(rng, cand.shape)
        arrival = cand.min(axis=2)
        arrival += biases_us[level + 1]
    arrival -= send_us[:, None]
    return arrival, QueueState(tuple(busy_after), state.next_message + batch)


@dataclass(frozen=True)
class BaselineResult:
    """Fairness and latency figures of one delivery scheme over the scored messages."""

    name: str
    """Short name: unicast, tree-h0, tree-nohold, jasper."""
    description: str
    """What the scheme does, in words."""
    messages: int
    """Scored messages n (warm-up excluded)."""
    fair: int
    """Messages with no late endpoint and DWS <= tau."""
    tau_us: float
    """The fairness threshold used."""
    p_fair: float
    """fair / messages."""
    p_fair_ci: tuple[float, float]
    """Wilson 95% interval of p_fair."""
    oml_p50_us: float
    """Median over messages of OML = max over endpoints of first arrival - send, µs."""
    oml_p99_us: float
    """99th percentile of OML, µs."""
    oml_mean_us: float
    """Mean OML, µs."""
    dws_p50_us: float
    """Median delivery window size (latest - earliest delivery), µs."""
    dws_p99_us: float
    """99th percentile of DWS, µs."""
    late_fraction: float | None
    """Late (endpoint, message) pairs / all pairs; None for schemes without a deadline."""
    last_delivery_p50_us: float
    """Median over messages of the last delivery - send, µs (the hold's cost for Jasper)."""
    endpoint_latency_mean_us: float
    """Mean first-arrival latency over all (endpoint, message) pairs, µs."""


class _Scorer:
    """Accumulates per-message figures of one scheme, window by window."""

    def __init__(self, name: str, description: str, has_deadline: bool) -> None:
        self.name = name
        self.description = description
        self.has_deadline = has_deadline
        self.oml: list[FloatArray] = []
        self.dws: list[FloatArray] = []
        self.last: list[FloatArray] = []
        self.late: list[npt.NDArray[np.int64]] = []
        self.latency_sum = 0.0
        self.pairs = 0

    def add(self, arrivals: FloatArray, deadline_us: float | None) -> None:
        oml = arrivals.max(axis=1)
        if deadline_us is None:
            delivered = arrivals
            late = np.zeros(arrivals.shape[0], dtype=np.int64)
        else:
            delivered = np.maximum(arrivals, deadline_us)
            late = (arrivals > deadline_us).sum(axis=1)
        last = delivered.max(axis=1)
        self.oml.append(oml)
        self.dws.append(last - delivered.min(axis=1))
        self.last.append(last)
        self.late.append(late)
        self.latency_sum += float(arrivals.sum())
        self.pairs += arrivals.size

    def result(self, tau_us: float) -> BaselineResult:
        oml = np.concatenate(self.oml)
        dws = np.concatenate(self.dws)
        late = np.concatenate(self.late)
        last = np.concatenate(self.last)
        n = int(oml.size)
        fair = int(np.count_nonzero((late == 0) & (dws <= tau_us)))
        return BaselineResult(
            name=self.name,
            description=self.description,
            messages=n,
            fair=fair,
            tau_us=tau_us,
            p_fair=fair / n,
            p_fair_ci=wilson_interval(fair, n),
            oml_p50_us=float(np.percentile(oml, 50)),
            oml_p99_us=float(np.percentile(oml, 99)),
            oml_mean_us=float(oml.mean()),
            dws_p50_us=float(np.percentile(dws, 50)),
            dws_p99_us=float(np.percentile(dws, 99)),
            late_fraction=float(late.sum()) / self.pairs if self.has_deadline else None,
            last_delivery_p50_us=float(np.percentile(last, 50)),
            endpoint_latency_mean_us=self.latency_sum / self.pairs,
        )


def _level_biases(scenario: Scenario, counts: Sequence[int]) -> list[FloatArray]:
    """Lemon bias per node, level by level; the same VM keeps its bias in every scheme.

    Each level draws from its own stream, and the endpoints from one keyed apart from the
    relays, so unicast and trees of any depth see the same lemon endpoints.
    """
    lemons = scenario.link.lemons
    out = [np.zeros(counts[0])]  # the root's receipt is time 0
    for level in range(1, len(counts) - 1):
        rng = np.random.default_rng((scenario.seed, 0xB1A5, 0, level))
        out.append(lemons.bias(rng, counts[level]))
    leaf_rng = np.random.default_rng((scenario.seed, 0xB1A5))
    out.append(lemons.endpoint_bias(leaf_rng, counts[-1]))
    return out


def simulate_baselines(scenario: Scenario) -> tuple[BaselineResult, ...]:
    """Run direct unicast, tree H=0, tree without hold and Jasper on one scenario.

    Without `interval_us` messages are independent; with it, they queue behind each other
    at every sender (`queued_first_arrivals`). The tree without hold and Jasper share the
    same random draws, so they differ only in the hold. Jasper's deadline for window w is
    send + max over endpoints of the `percentile` of their OWDs in window w-1, plus
    extra_hold_us; delivery is at max(deadline, first arrival), so on-time endpoints deliver
    at the deadline exactly and DWS is 0 unless someone is late. The first window is warm-up
    for every scheme and is not scored.
    """
    s = scenario
    jasper_plan = tree_shape(s.receivers, fanout=s.fanout, hedge=s.hedge, depth=s.depth)
    plain_plan = tree_shape(s.receivers, fanout=s.fanout, hedge=0, depth=jasper_plan.depth)
    trees = {
        "unicast": unicast_tree(s.receivers),
        "tree-h0": compile_tree(plain_plan),
        "tree-nohold": compile_tree(jasper_plan),
    }
    tree_biases = _level_biases(s, trees["tree-nohold"].counts)
    biases = {
        "unicast": [np.zeros(1), tree_biases[-1]],
        "tree-h0": tree_biases,
        "tree-nohold": tree_biases,
    }
    offsets = {name: tree.offsets_us(s.cost) for name, tree in trees.items()}
    rngs = {name: np.random.default_rng((s.seed, k)) for k, name in enumerate(trees, start=1)}
    queues = {name: QueueState.idle(tree) for name, tree in trees.items()}

    def arrivals(name: str, batch: int) -> FloatArray:
        if s.interval_us is None:
            return tree_first_arrivals(
                trees[name], offsets[name], s.link, biases[name], rngs[name], batch
            )
        out, queues[name] = queued_first_arrivals(
            trees[name],
            s.cost,
            s.link,
            biases[name],
            rngs[name],
            batch,
            interval_us=s.interval_us,
            state=queues[name],
        )
        return out

    h = jasper_plan.hedge
    shape = f"D={jasper_plan.depth} F={s.fanout}"
    scorers = {
        "unicast": _Scorer("unicast", "publisher sends N copies back to back", False),
        "tree-h0": _Scorer("tree-h0", f"tree {shape} H=0, deliver at first arrival", False),
        "tree-nohold": _Scorer(
            "tree-nohold", f"tree {shape} H={h}, deliver at first arrival", False
        ),
        "jasper": _Scorer(
            "jasper",
            f"tree {shape} H={h}, hold to send + max p{s.hold.percentile:g} OWD"
            f" + {s.hold.extra_hold_us:g} µs",
            True,
        ),
    }
    window = s.hold.window_messages
    estimate_us: float | None = None
    for start in range(0, s.messages, window):
        batch = min(window, s.messages - start)
        uni = arrivals("unicast", batch)
        plain = arrivals("tree-h0", batch)
        hedged = arrivals("tree-nohold", batch)
        if estimate_us is not None:
            scorers["unicast"].add(uni, None)
            scorers["tree-h0"].add(plain, None)
            scorers["tree-nohold"].add(hedged, None)
            scorers["jasper"].add(hedged, estimate_us + s.hold.extra_hold_us)
        # Each endpoint reports its percentile over this window; the root keeps the max.
        estimate_us = float(np.percentile(hedged, s.hold.percentile, axis=0).max())
    return tuple(sc.result(s.tau_us) for sc in scorers.values())


@dataclass(frozen=True)
class HedgingRow:
    """Hedging Monte Carlo for one H, in link units (uniform U(0,1) links, no host cost)."""

    hedge: int
    """Sibling hedging H."""
    endpoint_mean: float
    """Mean over (endpoint, message) of the first-arrival latency."""
    endpoint_std: float
    """Standard deviation of the same."""
    oml_mean: float
    """Mean over messages of max over endpoints of the first-arrival latency."""
    oml_std: float
    """Standard deviation of the same."""
    paper_mean: float | None
    """The paper's mean for this H, if it reports one."""
    paper_std: float | None
    """The paper's spread for this H, if it reports one."""


# The paper's Monte Carlo (uniform link latencies, D=4): H -> (mean, spread) in link units.
PAPER_HEDGING = {0: (2.0, 0.6), 1: (1.3, 0.4), 2: (0.9, 0.3), 4: (0.7, 0.2)}


def hedging_monte_carlo(
    *,
    receivers: int = 10_000,
    fanout: int = 10,
    depth: int = 4,
    hedges: Sequence[int] = (0, 1, 2, 4),
    messages: int = 200,
    seed: int = 1,
) -> tuple[HedgingRow, ...]:
    """Reproduce the paper's hedging Monte Carlo over real tree shapes.

    Model: every copy crosses a link of latency U(0, 1) drawn independently; relays add no
    processing or send time; each node keeps its first copy. Time 0 is the root's send.
    """
    link = LinkModel(body=UniformLatency(low_us=0.0, high_us=1.0))
    free = CostModel(level_processing_us=0.0, per_send_us=0.0)
    rows = []
    for h in hedges:
        tree = compile_tree(tree_shape(receivers, fanout=fanout, hedge=h, depth=depth))
        biases = [np.zeros(c) for c in tree.counts]
        rng = np.random.default_rng((seed, 7, h))
        total = total_sq = 0.0
        omls = []
        for start in range(0, messages, 50):
            batch = min(50, messages - start)
            arr = tree_first_arrivals(tree, tree.offsets_us(free), link, biases, rng, batch)
            total += float(arr.sum())
            total_sq += float(np.square(arr).sum())
            omls.append(arr.max(axis=1))
        pairs = messages * receivers
        mean = total / pairs
        std = math.sqrt(max(0.0, total_sq / pairs - mean * mean))
        oml = np.concatenate(omls)
        paper = PAPER_HEDGING.get(h)
        rows.append(
            HedgingRow(
                hedge=h,
                endpoint_mean=mean,
                endpoint_std=std,
                oml_mean=float(oml.mean()),
                oml_std=float(oml.std()),
                paper_mean=paper[0] if paper else None,
                paper_std=paper[1] if paper else None,
            )
        )
    return tuple(rows)


def hedging_recursion(
    *,
    depth: int = 4,
    hedges: Sequence[int] = (0, 1, 2, 4),
    population: int = 200_000,
    seed: int = 1,
) -> tuple[tuple[int, float, float], ...]:
    """The same Monte Carlo with the tree abstracted away: (H, mean, std) per H.

    Level 1 gets one U(0,1) copy from the root; a node at each level below keeps the first
    of H+1 copies, each from an independent parent drawn from the level above plus its own
    U(0,1) link. Real trees correlate a node's parents (they share a grandparent), which this
    idealization ignores.
    """
    rows = []
    for h in hedges:
        rng = np.random.default_rng((seed, 9, h))
        latency = rng.random(population)
        for _ in range(depth - 1):
            parents = latency[rng.integers(0, population, size=(population, h + 1))]
            latency = (parents + rng.random(parents.shape)).min(axis=1)
        rows.append((h, float(latency.mean()), float(latency.std())))
    return tuple(rows)


@dataclass(frozen=True)
class ShapeRow:
    """Median OML of one tree shape at the paper's Table 1 scale."""

    depth: int
    """Tree depth D."""
    fanout: int
    """Fan-out F."""
    relays: int
    """Relays the shape needs."""
    oml_p50_h0_us: float
    """Median OML without hedging, µs."""
    oml_p50_hedged_us: float
    """Median OML with the scenario's hedging, µs."""
    cost_only_us: float
    """The cost model alone along the slowest path without hedging (no link latency), µs."""
    paper_us: float | None
    """The paper's median OML for this shape, µs."""


# The paper's Table 1 at N=1000: (D, F) -> median OML in µs.
PAPER_TABLE1 = {(2, 32): 282.0, (3, 10): 217.0, (4, 6): 226.0}


def table1_shapes(
    *,
    receivers: int = 1000,
    shapes: Sequence[tuple[int, int]] = ((2, 32), (3, 10), (4, 6)),
    hedge: int = 2,
    messages: int = 500,
    seed: int = 1,
    cost: CostModel | None = None,
    link: LinkModel | None = None,
) -> tuple[ShapeRow, ...]:
    """Median OML per tree shape under the cost and link models (the paper's Table 1 trend)."""
    cost = cost or CostModel()
    link = link or LinkModel()
    rows = []
    for depth, fanout in shapes:
        medians = []
        relays = 0
        slowest = 0.0
        for h in (0, hedge):
            plan = tree_shape(receivers, fanout=fanout, hedge=h, depth=depth)
            tree = compile_tree(plan)
            relays = sum(len(level) for level in plan.levels)
            offsets = tree.offsets_us(cost)
            if h == 0:
                slowest = _slowest_cost_path(tree, offsets)
            scenario = Scenario(receivers=receivers, seed=seed, link=link)
            biases = _level_biases(scenario, tree.counts)
            rng = np.random.default_rng((seed, 11, depth, fanout, h))
            omls = []
            for start in range(0, messages, 100):
                batch = min(100, messages - start)
                arr = tree_first_arrivals(tree, offsets, link, biases, rng, batch)
                omls.append(arr.max(axis=1))
            medians.append(float(np.median(np.concatenate(omls))))
        rows.append(
            ShapeRow(
                depth=depth,
                fanout=fanout,
                relays=relays,
                oml_p50_h0_us=medians[0],
                oml_p50_hedged_us=medians[1],
                cost_only_us=slowest,
                paper_us=PAPER_TABLE1.get((depth, fanout)),
            )
        )
    return tuple(rows)


def _slowest_cost_path(tree: CompiledTree, offsets_us: Sequence[FloatArray]) -> float:
    """Latest leaf arrival when links take no time, over own-parent copies only."""
    arrival: FloatArray = np.zeros(1)
    for level in range(tree.depth):
        arrival = arrival[tree.parent_index[level][:, 0]] + offsets_us[level][:, 0]
    return float(arrival.max())
