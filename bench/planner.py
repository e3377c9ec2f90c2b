"""Planner benchmark: incremental attach and full plan times; measured vs random placement OML.

Run: python bench/planner.py [--quick]

Figures are ratios against baselines measured in the same run: attach time against the goal
(1 ms) and against a full re-plan of the same tree, full plan time against its goal
(100 ms at 1,000 endpoints, 1 s at 10,000), and the predicted OML of the measured placement
against a random placement of the same relays on the same latency matrix.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jasper.placement import (
    Endpoint,
    LatencyMatrix,
    LinkStats,
    choose_depth,
    full_plan,
    predict_oml,
    random_plan,
)

PER_HOST = 15
"""Endpoints per receiver VM (the paper emulated 10-20)."""


class TrueLatency(Mapping[tuple[str, str], LinkStats]):
    """The network as it is: every link's one-way delay from the two VMs' own delays.

    Computed on demand, so 10,000 endpoints do not need a 10^7-entry table. Lemons add
    100-300 µs to everything they send or receive (noisy neighbour, bad NIC queue).
    """

    def __init__(self, nodes: list[str], lemons: set[str], rng: random.Random) -> None:
        self.extra = {
            n: rng.uniform(100_000, 300_000) if n in lemons else rng.uniform(0, 6_000)
            for n in nodes
        }
        self.lemons = lemons

    def __getitem__(self, key: tuple[str, str]) -> LinkStats:
        a, b = key
        if a not in self.extra or b not in self.extra:
            raise KeyError(key)
        owd = 25_000 + (self.extra[a] + self.extra[b]) / 2 + (hash(key) % 2_000)
        jitter = 40_000 if (a in self.lemons or b in self.lemons) else 1_500
        return LinkStats(int(owd), jitter, 64)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        raise TypeError("the true matrix is not enumerable; sample it")

    def __len__(self) -> int:
        return len(self.extra) ** 2


def probe_sample(
    truth: TrueLatency, relays: list[str], hosts: list[str], rng: random.Random, peers: int = 16
) -> LatencyMatrix:
    """What the controller knows: each relay probed `peers` random relays and hosts."""
    links: dict[tuple[str, str], LinkStats] = {}
    pool = relays + hosts
    for r in relays:
        for p in rng.sample(pool, min(peers, len(pool))):
            if p != r:
                s = truth[(r, p)]
                noisy = LinkStats(int(s.owd_ns * rng.uniform(0.95, 1.05)), s.jitter_ns, 64)
                links[(r, p)] = noisy
                links[(p, r)] = noisy
    return LatencyMatrix(links)


def world(
    n: int, rng: random.Random, lemon_share: float = 0.1
) -> tuple[list[Endpoint], list[str], TrueLatency, LatencyMatrix]:
    eps = [Endpoint(f"s{i}", f"h{i // PER_HOST}") for i in range(n)]
    hosts = sorted({e.host for e in eps})
    # As many relays as the paper's tree needs, plus spares so lemons can sit out.
    from jasper.tree import default_depth, level_counts

    need = sum(level_counts(n, fanout=10, depth=default_depth(n, 10))[:-1])
    relays = [f"relay{i}" for i in range(int(need * (1 + lemon_share)) + 1)]
    lemons = set(rng.sample(relays, int(len(relays) * lemon_share)))
    truth = TrueLatency(["pub", *relays, *hosts], lemons, rng)
    return eps, relays, truth, probe_sample(truth, relays, hosts, rng)


def timed(fn: object, *args: object, **kw: object) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kw)  # type: ignore[operator]
    return time.perf_counter() - t, out


def bench_times(n: int, rng: random.Random, attaches: int) -> dict[str, float]:
    eps, relays, _truth, matrix = world(n, rng)
    plan_times = []
    for _ in range(3):
        t, _ = timed(full_plan, eps, relays, publisher="pub", matrix=matrix)
        plan_times.append(t)
    placement = full_plan(eps, relays, publisher="pub", matrix=matrix)
    attach_times = []
    for i in range(attaches):
        ep = Endpoint(f"new{i}", f"h{rng.randrange(n // PER_HOST + 1)}")
        t0 = time.perf_counter()
        placement.attach(ep)
        attach_times.append(time.perf_counter() - t0)
    attach_times.sort()
    return {
        "plan_s": statistics.median(plan_times),
        "attach_p50_s": attach_times[len(attach_times) // 2],
        "attach_p99_s": attach_times[int(len(attach_times) * 0.99)],
        "depth": float(choose_depth(n, len(relays))),
        "relays": float(len(relays)),
    }


def bench_oml(n: int, seeds: int) -> tuple[float, float, float]:
    measured, rnd, lemon_free = [], [], []
    for seed in range(seeds):
        rng = random.Random(seed)
        eps, relays, truth, matrix = world(n, rng)
        truth_m = LatencyMatrix(truth)
        good = full_plan(eps, relays, publisher="pub", matrix=matrix)
        base = random_plan(eps, relays, publisher="pub", rng=random.Random(seed + 1000))
        measured.append(predict_oml(good, truth_m).oml_ns)
        rnd.append(predict_oml(base, truth_m).oml_ns)
        lemon_free.append(sum(1 for r in good.relay_nodes() if r in truth.lemons))
    return statistics.median(measured), statistics.median(rnd), statistics.mean(lemon_free)


def bench_api_subscribe(count: int) -> tuple[float, float]:
    """(median subscribe through the planner incl. its durable SQLite commit, median of the
    placement step alone within it), measured on the same calls."""
    from controller.metrics import ControllerMetrics
    from controller.planner import Planner
    from controller.settings import Settings
    from controller.store import Database, StreamRow

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.model_validate(
            {"db_path": f"{tmp}/c.db", "admin_token": "a", "node_token": "n"}
        )
        db = Database(settings.db_path)
        planner = Planner(database=db, settings=settings, metrics=ControllerMetrics())
        for i in range(12):
            planner.register_node(
                name=f"relay{i}",
                role="relay",
                data_addr="10.0.0.1",
                port=7000 + i,
                capacity=1,
                probe_port=None,
            )
        planner.register_node(
            name="rx",
            role="receiver",
            data_addr="10.0.1.1",
            port=10_000,
            capacity=count,
            probe_port=None,
        )
        planner.create_stream(StreamRow(1, "md", 100.0, 2, 10, 500_000, "fixed", None))
        planner.create_mp("mp")
        placement_step: list[float] = []
        plans = planner.plans[1]
        times = []
        for i in range(count):
            t0 = time.perf_counter()
            planner.subscribe(mp_id=1, stream_id=1, addr="10.0.1.1", port=10_000 + i, deliver=None)
            times.append(time.perf_counter() - t0)
            # The in-memory step alone, on a copy-free probe: attach and detach one endpoint.
            probe = Endpoint("probe", "rx")
            t1 = time.perf_counter()
            plans.active.attach(probe)
            placement_step.append(time.perf_counter() - t1)
            plans.active.detach("probe")
        db.close()
    return statistics.median(times), statistics.median(placement_step)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer seeds and attaches")
    args = ap.parse_args()
    seeds = 2 if args.quick else 5
    attaches = 200 if args.quick else 2000
    rng = random.Random(1)

    print("== plan and attach times (goal ratio < 1 passes)")
    print(
        f"{'endpoints':>9} {'relays':>6} {'D':>2} {'full plan':>10} {'/goal':>6} "
        f"{'attach p50':>10} {'p99':>8} {'/1ms':>6} {'attach/plan':>11}"
    )
    for n, goal in ((1_000, 0.1), (10_000, 1.0)):
        r = bench_times(n, rng, attaches)
        print(
            f"{n:>9} {int(r['relays']):>6} {int(r['depth']):>2} {r['plan_s'] * 1e3:>8.1f}ms "
            f"{r['plan_s'] / goal:>6.2f} {r['attach_p50_s'] * 1e6:>8.1f}µs "
            f"{r['attach_p99_s'] * 1e6:>6.1f}µs {r['attach_p99_s'] / 1e-3:>6.3f} "
            f"{r['attach_p50_s'] / r['plan_s']:>11.2e}"
        )

    print("\n== predicted OML (slowest endpoint, first of H+1 copies), same latency matrix")
    print("   10% lemon VMs (+100..300 µs); measured placement knows only 16 probes per relay")
    print(
        f"{'endpoints':>9} {'measured':>10} {'random':>10} {'measured/random':>15} "
        f"{'lemons used':>11}"
    )
    for n in (1_000, 10_000):
        m_ns, r_ns, lem = bench_oml(n, seeds if n == 1_000 else max(1, seeds // 2))
        print(f"{n:>9} {m_ns / 1e3:>8.1f}µs {r_ns / 1e3:>8.1f}µs {m_ns / r_ns:>15.3f} {lem:>11.1f}")

    print("\n== subscribe through the planner with its SQLite commit (WAL, synchronous=FULL)")
    api, attach = bench_api_subscribe(200 if args.quick else 1000)
    print(
        f"   median {api * 1e6:.0f} µs per subscribe; the placement step alone "
        f"{attach * 1e6:.1f} µs ({api / attach:.0f}x: validation and the durable commit)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
