"""Simulator: exact cost model on fixed links, hold logic, hedging statistics, CLI output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jasper.latency_model import LemonVMs, LinkModel, LognormalLatency, UniformLatency
from jasper.metrics import fairness_report, wilson_interval
from jasper.records import DELIVERY_DTYPE, SENT_DTYPE
from jasper.simulate import (
    PAPER_HEDGING,
    BaselineResult,
    CostModel,
    HoldPolicy,
    QueueState,
    Scenario,
    compile_tree,
    hedging_monte_carlo,
    hedging_recursion,
    queued_first_arrivals,
    simulate_baselines,
    table1_shapes,
    tree_first_arrivals,
    unicast_arrivals,
    unicast_tree,
)
from jasper.tree import parse_node, tree_shape
from jasper_cli.main import main

FIXED_LINK = LinkModel(body=UniformLatency(low_us=4.0, high_us=4.0))
COST = CostModel()


def zero_biases(counts: tuple[int, ...]) -> list[np.ndarray]:
    return [np.zeros(c) for c in counts]


def by_name(results: tuple[BaselineResult, ...]) -> dict[str, BaselineResult]:
    return {r.name: r for r in results}


def test_compiled_tree_agrees_with_forwarding_tables() -> None:
    plan = tree_shape(150, fanout=4, hedge=2)
    tree = compile_tree(plan)
    assert tree.counts == (*(len(level) for level in plan.levels), 150)
    for level in range(plan.depth):
        for i in range(tree.counts[level + 1]):
            node = plan.levels[level + 1][i] if level + 1 < plan.depth else f"e{i}"
            for j, parent in enumerate(plan.parents[node]):
                assert tree.parent_index[level][i, j] == parse_node(parent)[1]
                slot = tree.send_slot[level][i, j]
                assert plan.forwarding[parent][slot - 1].target == node
            assert (tree.send_slot[level][i, len(plan.parents[node]) :] == 0).all()


def test_unhedged_tree_follows_cost_model_exactly() -> None:
    plan = tree_shape(1000, fanout=10, hedge=0)
    tree = compile_tree(plan)
    arr = tree_first_arrivals(
        tree,
        tree.offsets_us(COST),
        FIXED_LINK,
        zero_biases(tree.counts),
        np.random.default_rng(0),
        3,
    )
    assert arr.shape == (3, 1000)
    # Leaf e(100a + 10b + c) is child b+1 of the root's child a+1, etc.: each hop costs
    # 30 + slot * 2.7 + 4 µs of link.
    for leaf in (0, 1, 9, 10, 537, 999):
        a, b, c = leaf // 100, (leaf // 10) % 10, leaf % 10
        expected = 3 * (30 + 4) + (a + 1 + b + 1 + c + 1) * 2.7
        assert arr[:, leaf] == pytest.approx([expected] * 3)
    assert arr.max() == pytest.approx(3 * 34 + 30 * 2.7)


def test_hedge_copy_wins_only_when_it_is_earlier() -> None:
    # N=4, F=2, H=1: r1.0 sends e0, e1 (own) then e2, e3 (hedge); r1.1 sends e2, e3 then
    # e0, e1. The root sends r1.0 first, so r1.1 starts 2.7 µs later.
    plan = tree_shape(4, fanout=2, hedge=1)
    tree = compile_tree(plan)
    link = LinkModel(body=UniformLatency(low_us=0.0, high_us=0.0))
    offsets = tree.offsets_us(COST)
    rng = np.random.default_rng(0)
    arr = tree_first_arrivals(tree, offsets, link, zero_biases(tree.counts), rng, 1)[0]
    r10, r11 = 30 + 2.7, 30 + 5.4
    # With equal links, own copies come first: hedges are queued behind own children.
    assert arr == pytest.approx([r10 + 32.7, r10 + 35.4, r11 + 32.7, r11 + 35.4])
    # A relay 50 µs late (a lemon) is covered by its sibling's hedge copies.
    biases = [np.zeros(1), np.array([50.0, 0.0]), np.zeros(4)]
    arr = tree_first_arrivals(tree, offsets, link, biases, rng, 1)[0]
    assert arr == pytest.approx([r11 + 30 + 3 * 2.7, r11 + 30 + 4 * 2.7, r11 + 32.7, r11 + 35.4])


def test_unicast_sends_back_to_back() -> None:
    arr = unicast_arrivals(5, COST, FIXED_LINK, np.zeros(5), np.random.default_rng(0), 2)
    assert arr[0] == pytest.approx([30 + 4 + k * 2.7 for k in range(1, 6)])


def test_queued_sender_waits_for_its_previous_message() -> None:
    # One sender, 3 receivers, a message every 1 µs: each message's 3 copies take 8.1 µs.
    tree = unicast_tree(3)
    biases = [np.zeros(1), np.zeros(3)]
    rng = np.random.default_rng(0)
    state = QueueState.idle(tree)
    arr, state = queued_first_arrivals(
        tree, COST, FIXED_LINK, biases, rng, 3, interval_us=1.0, state=state
    )
    starts = [30.0, 30.0 + 8.1, 30.0 + 16.2]
    for m, start in enumerate(starts):
        assert arr[m] == pytest.approx([start + k * 2.7 + 4 - m for k in (1, 2, 3)])
    assert state.next_message == 3
    assert state.busy_until_us[0] == pytest.approx([30.0 + 3 * 8.1])
    # The queue carries over to the next batch.
    more, _ = queued_first_arrivals(
        tree, COST, FIXED_LINK, biases, rng, 1, interval_us=1.0, state=state
    )
    assert more[0, 0] == pytest.approx(30 + 3 * 8.1 + 2.7 + 4 - 3)


def test_queueing_with_a_long_interval_is_the_independent_model() -> None:
    tree = compile_tree(tree_shape(300, fanout=6, hedge=2))
    link = LinkModel()
    biases = zero_biases(tree.counts)
    free = tree_first_arrivals(
        tree, tree.offsets_us(COST), link, biases, np.random.default_rng(9), 20
    )
    queued, _ = queued_first_arrivals(
        tree,
        COST,
        link,
        biases,
        np.random.default_rng(9),
        20,
        interval_us=1e5,
        state=QueueState.idle(tree),
    )
    assert queued == pytest.approx(free, abs=1e-6)


def test_overload_grows_latency_and_breaks_fairness() -> None:
    # A hedged relay sends (H+1)*F = 30 copies, 81 µs per message: 5 µs apart overloads it.
    fine = by_name(simulate_baselines(Scenario(receivers=300, messages=300, interval_us=1e3)))
    jammed = by_name(simulate_baselines(Scenario(receivers=300, messages=300, interval_us=5.0)))
    assert fine["tree-nohold"].oml_p99_us < 300
    assert jammed["tree-nohold"].oml_p50_us > 10 * fine["tree-nohold"].oml_p50_us
    assert jammed["jasper"].p_fair < fine["jasper"].p_fair


def test_deterministic_links_make_jasper_perfectly_fair() -> None:
    scenario = Scenario(
        receivers=300, fanout=10, hedge=2, messages=250, link=FIXED_LINK, tau_us=0.0
    )
    results = by_name(simulate_baselines(scenario))
    jasper, nohold, unicast = results["jasper"], results["tree-nohold"], results["unicast"]
    assert jasper.messages == 150  # first window of 100 is warm-up
    assert jasper.fair == 150 and jasper.p_fair == 1.0
    assert jasper.late_fraction == 0.0
    assert jasper.dws_p99_us == 0.0
    # The p97 over a fixed-latency window is the OML itself, so everyone releases at it.
    assert jasper.last_delivery_p50_us == pytest.approx(jasper.oml_p50_us)
    assert nohold.p_fair == 0.0 and nohold.late_fraction is None
    assert unicast.oml_p50_us == pytest.approx(30 + 4 + 300 * 2.7)
    assert unicast.dws_p50_us == pytest.approx(299 * 2.7)


def test_jasper_hold_matches_an_independent_recount() -> None:
    link = LinkModel(
        body=LognormalLatency(base_us=5, median_us=10, sigma=0.5, spike_probability=0.01)
    )
    hold = HoldPolicy(percentile=90.0, window_messages=40, extra_hold_us=2.0)
    scenario = Scenario(receivers=120, fanout=5, hedge=1, messages=200, seed=7, link=link,
                        hold=hold, tau_us=0.5)  # fmt: skip
    jasper = by_name(simulate_baselines(scenario))["jasper"]

    # Recompute from the same random stream the simulator documents for the Jasper tree.
    tree = compile_tree(tree_shape(120, fanout=5, hedge=1))
    rng = np.random.default_rng((7, 3))
    offsets = tree.offsets_us(scenario.cost)
    fair = late_pairs = 0
    estimate = None
    sent, deliveries = [], []
    for window in range(5):
        arr = tree_first_arrivals(tree, offsets, link, zero_biases(tree.counts), rng, 40)
        # Ground-truth records in ns, as the data plane would log them (1 s between messages).
        deadline = 0.0 if estimate is None else estimate + 2.0
        for i, row in enumerate(arr):
            seq = window * 40 + i + 1
            send_ns = seq * 10**9
            deadline_ns = send_ns + round(deadline * 1000)
            sent.append((1, 1, seq, send_ns, deadline_ns))
            for e, t in enumerate(row):
                arrival_ns = send_ns + round(t * 1000)
                release_ns = max(arrival_ns, deadline_ns)
                deliveries.append((f"e{e}", 1, 1, seq, arrival_ns, release_ns, deadline_ns, "", 1))
        if estimate is not None:
            for row in arr:
                late = int((row > deadline).sum())
                late_pairs += late
                delivered = np.maximum(row, deadline)
                fair += late == 0 and delivered.max() - delivered.min() <= 0.5
        estimate = max(np.percentile(arr[:, e], 90) for e in range(120))
    assert jasper.fair == fair
    assert jasper.late_fraction == pytest.approx(late_pairs / (160 * 120))
    assert 0 < jasper.fair < 160, "the model should make some messages late"

    # The reference metrics (docs/metrics.md) agree, computed from the records alone.
    report = fairness_report(
        np.array(sent, dtype=SENT_DTYPE),
        np.array(deliveries, dtype=DELIVERY_DTYPE),
        {1: [f"e{e}" for e in range(120)]},
        tau_ns=500,
        warmup_messages=40,
    )
    assert report.messages == jasper.messages == 160
    assert report.fair_messages == jasper.fair
    assert report.late_pairs == late_pairs
    assert report.p_fair_ci == pytest.approx(jasper.p_fair_ci)
    assert report.oml_ns.p50 is not None and report.oml_ns.p99 is not None
    assert report.oml_ns.p50 / 1000 == pytest.approx(jasper.oml_p50_us, abs=0.01)
    assert report.oml_ns.p99 / 1000 == pytest.approx(jasper.oml_p99_us, abs=0.01)


def test_jasper_beats_the_baselines_on_fairness_by_default() -> None:
    results = by_name(simulate_baselines(Scenario(receivers=500, messages=400)))
    assert results["jasper"].p_fair > 0.5
    for name in ("unicast", "tree-h0", "tree-nohold"):
        assert results[name].p_fair < results["jasper"].p_fair
    # Hedging shortens the slowest path; unicast is bound by N back-to-back sends.
    assert results["tree-nohold"].oml_p50_us < results["tree-h0"].oml_p50_us
    assert results["unicast"].oml_p50_us > 500 * 2.7
    jasper = results["jasper"]
    assert jasper.p_fair_ci == wilson_interval(jasper.fair, jasper.messages)
    assert jasper.p_fair_ci[0] < jasper.p_fair < jasper.p_fair_ci[1]


def test_same_seed_same_numbers_other_seed_differs() -> None:
    a = simulate_baselines(Scenario(receivers=200, messages=200, seed=3))
    b = simulate_baselines(Scenario(receivers=200, messages=200, seed=3))
    c = simulate_baselines(Scenario(receivers=200, messages=200, seed=4))
    assert a == b
    assert a != c


def test_lemon_vms_delay_every_copy_they_receive() -> None:
    lemons = LemonVMs(fraction=1.0, extra_us=7.0)
    assert lemons.bias(np.random.default_rng(0), 3) == pytest.approx([7.0] * 3)
    link = LinkModel(body=FIXED_LINK.body, lemons=lemons)
    plain = by_name(simulate_baselines(Scenario(receivers=100, messages=150, link=FIXED_LINK)))
    slow = by_name(simulate_baselines(Scenario(receivers=100, messages=150, link=link)))
    # Depth 2: a level-1 relay and the endpoint are both lemons; the root's receipt is time 0.
    assert slow["tree-h0"].oml_p50_us == pytest.approx(plain["tree-h0"].oml_p50_us + 14.0)
    assert slow["unicast"].oml_p50_us == pytest.approx(plain["unicast"].oml_p50_us + 7.0)


def test_endpoints_on_one_vm_share_its_bias() -> None:
    lemons = LemonVMs(fraction=0.5, extra_us=3.0, endpoints_per_vm=10)
    bias = lemons.endpoint_bias(np.random.default_rng(1), 95)
    assert bias.shape == (95,)
    for start in range(0, 95, 10):
        assert len(set(bias[start : start + 10])) == 1
    assert set(bias) == {0.0, 3.0}


def test_latency_distributions_have_their_stated_shape() -> None:
    rng = np.random.default_rng(5)
    u = UniformLatency(low_us=2.0, high_us=6.0).sample(rng, (100_000,))
    assert u.min() >= 2.0 and u.max() < 6.0
    assert u.mean() == pytest.approx(4.0, abs=0.05)
    ln = LognormalLatency(base_us=5.0, median_us=10.0, sigma=0.3, spike_probability=0.0)
    body = ln.sample(rng, (100_000,))
    assert np.median(body) == pytest.approx(15.0, abs=0.1)
    spiky = LognormalLatency(spike_probability=0.01, spike_min_us=1000, spike_max_us=1001)
    s = spiky.sample(rng, (100_000,))
    assert (s > 900).mean() == pytest.approx(0.01, abs=0.002)


def test_hedging_monte_carlo_reproduces_the_paper_trend() -> None:
    rows = hedging_monte_carlo(receivers=1000, fanout=6, depth=4, messages=100, seed=2)
    means = [r.endpoint_mean for r in rows]
    assert means == sorted(means, reverse=True)
    # H=0 is the sum of four U(0,1): mean 2, std sqrt(4/12); that is the paper's 2.0/0.6.
    assert rows[0].endpoint_mean == pytest.approx(2.0, abs=0.02)
    assert rows[0].endpoint_std == pytest.approx(math.sqrt(4 / 12), abs=0.01)
    for row in rows:
        assert row.paper_mean is not None and row.paper_std is not None
        assert row.endpoint_mean == pytest.approx(row.paper_mean, abs=0.15)
        assert row.oml_mean > row.endpoint_mean
    # With independent parents the recursion lands on the paper's figures (H=2: 0.949).
    for h, mean, std in hedging_recursion(population=400_000):
        assert mean == pytest.approx(PAPER_HEDGING[h][0], abs=0.055)
        assert std == pytest.approx(PAPER_HEDGING[h][1], abs=0.03)


def test_table1_shapes_follow_the_paper_trend_with_hedging() -> None:
    rows = {(r.depth, r.fanout): r for r in table1_shapes(messages=200)}
    assert rows[(3, 10)].cost_only_us == pytest.approx(3 * 30 + 30 * 2.7)
    assert rows[(2, 32)].cost_only_us == pytest.approx(2 * 30 + 64 * 2.7)
    hedged = {k: r.oml_p50_hedged_us for k, r in rows.items()}
    assert hedged[(3, 10)] < hedged[(4, 6)] < hedged[(2, 32)]


@pytest.mark.parametrize(
    "kwargs",
    [{"receivers": 0}, {"messages": 100}, {"tau_us": -1.0}, {"interval_us": 0.0}],
)
def test_scenario_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Scenario(**kwargs)  # type: ignore[arg-type]


def test_model_validation() -> None:
    with pytest.raises(ValueError):
        UniformLatency(low_us=3, high_us=2)
    with pytest.raises(ValueError):
        LognormalLatency(spike_probability=2)
    with pytest.raises(ValueError):
        LemonVMs(fraction=1.5)
    with pytest.raises(ValueError):
        HoldPolicy(window_messages=0)
    with pytest.raises(ValueError):
        CostModel(per_send_us=-1)


def test_cli_prints_baselines_and_paper_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "sim.json"
    argv = ["simulate", "--receivers", "200", "--messages", "300", "--hedging-receivers",
            "1000", "--hedging-messages", "20", "--json", str(out_file)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    for needle in ("unicast", "tree-h0", "tree-nohold", "jasper", "τ = 0 µs", "Wilson",
                   "Hedging Monte Carlo", "Table 1", "2.0/0.6"):  # fmt: skip
        assert needle in out
    report = json.loads(out_file.read_text())
    assert [b["name"] for b in report["baselines"]] == [
        "unicast",
        "tree-h0",
        "tree-nohold",
        "jasper",
    ]
    assert report["baselines"][3]["messages"] == 200
    assert len(report["hedging"]) == 4 and len(report["table1"]) == 3


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--receivers", "0", "--skip-paper-checks"])
    assert exit_info.value.code == 2
    assert "--receivers must be >= 1 (got 0)" in capsys.readouterr().err
