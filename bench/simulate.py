"""Simulator throughput: simulated messages per second at 10,000 receivers vs 1,000, side by side.

Run: python3 bench/simulate.py [--messages 1000] [--repeat 3]

Two figures, each against a baseline measured in the same run:
1. the full four-scheme comparison (`simulate_baselines`: unicast, tree H=0, tree without hold,
   Jasper) at 10,000 receivers, against the same run at 1,000 receivers;
2. the hedged tree walk alone at 10,000 receivers against only drawing its link latencies
   (the floor for any simulator of this model).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import numpy as np

from jasper.simulate import Scenario, compile_tree, simulate_baselines, tree_first_arrivals
from jasper.tree import tree_shape


def best_of(repeat: int, work: Callable[[], object]) -> float:
    """Fastest wall time of `repeat` runs, in seconds (the least disturbed run)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="messages per run (1000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, best kept (3)")
    args = parser.parse_args()

    print(f"simulate_baselines, {args.messages} messages (4 schemes per message), best of "
          f"{args.repeat}")  # fmt: skip
    rates = {}
    for receivers in (1_000, 10_000):
        scenario = Scenario(receivers=receivers, messages=args.messages)
        seconds = best_of(args.repeat, functools.partial(simulate_baselines, scenario))
        rates[receivers] = args.messages / seconds
        print(
            f"  {receivers:>6} receivers: {seconds:7.3f} s  {rates[receivers]:9.0f} msg/s  "
            f"{rates[receivers] * receivers / 1e6:7.2f} M endpoint-messages/s"
        )
    ratio = rates[10_000] / rates[1_000]
    print(
        f"  ratio 10,000 / 1,000 receivers: {ratio:.3f}x the message rate "
        f"({ratio * 10:.2f}x the endpoint-message rate; 1.0x would be perfect scaling)"
    )

    # The floor: drawing the link latency of every copy, which any simulator of this model
    # must do. The ratio says how much the tree walk and scoring add on top.
    scenario = Scenario(receivers=10_000)
    tree = compile_tree(tree_shape(10_000, fanout=10, hedge=2))
    offsets = tree.offsets_us(scenario.cost)
    biases = [np.zeros(c) for c in tree.counts]
    copies = sum(idx.shape[0] * idx.shape[1] for idx in tree.parent_index)
    count = min(args.messages, 200)

    def walk() -> None:
        rng = np.random.default_rng(1)
        for _ in range(count // 10):
            tree_first_arrivals(tree, offsets, scenario.link, biases, rng, 10)

    def draw_only() -> None:
        rng = np.random.default_rng(1)
        for _ in range(count // 10):
            for idx in tree.parent_index:
                scenario.link.body.sample(rng, (10, *idx.shape))

    done = count // 10 * 10
    sim = done / best_of(args.repeat, walk)
    floor = done / best_of(args.repeat, draw_only)
    print(
        f"\nhedged tree alone (N=10,000, D=4, F=10, H=2: {copies} copies per message), "
        f"{done} messages, best of {args.repeat}"
    )
    print(f"  link draws only (floor): {floor:9.0f} msg/s  {floor * copies / 1e6:7.1f} M copies/s")
    print(f"  full tree walk:          {sim:9.0f} msg/s  {sim * copies / 1e6:7.1f} M copies/s")
    print(f"  ratio tree walk / floor: {sim / floor:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
