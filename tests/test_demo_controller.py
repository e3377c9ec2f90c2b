"""`jasper demo` on the real control path: controller, MPs over REST, agents, skewed clocks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from jasper.records import expand_releases
from overlay.recordlog import load_releases
from tests.test_demo import demo_argv, processes_mentioning


@pytest.mark.slow
def test_demo_through_the_controller(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run(
        demo_argv(out, "--rate", "50", "--duration", "2"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    for needle in ("control path: controller", "predicted OML", "P(F)", "one-way delay", "hold"):
        assert needle in text, needle
    assert "(controller control path)" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["control"] == "controller"
    fair = summary["fairness"]
    assert fair["messages"] == 100 and fair["lost_pairs"] == 0
    assert fair["expected_pairs"] == 100 * 20 and fair["tau_ns"] == 50_000
    assert set(summary["p_fair_by_tau_ns"]) == {"100000", "500000", "1000000"}

    # The controller planned the tree: root + F leaf relays, H+1 parents for every endpoint,
    # and the data plane really delivered from H+1 distinct parents.
    tree = summary["tree"]
    assert tree["relays_per_level"] == [1, 5] and tree["planned_parents_min"] == 3
    assert tree["endpoints"] == 20 and tree["predicted_oml_us"] > 0
    counters = summary["counters"]
    assert counters["endpoints_with_h_plus_1_parents"] == 20
    assert counters["duplicates_dropped_endpoints"] == 100 * 20 * 2
    # Endpoints are the controller's, one MP subscription each (named s<subscription id>).
    deliveries = expand_releases(load_releases(next(out.glob("releases-*.npz"))))
    assert {str(e) for e in deliveries["endpoint"]} == {
        e["name"]
        for e in json.loads((out / "topology.json").read_text())["receivers"][0]["endpoints"]
    }
    assert all(str(e).startswith("s") for e in deliveries["endpoint"])

    # Clocks: skew injected per process, corrected against the reference chronyd.
    clocks = summary["clocks"]
    assert clocks["corrected"] and clocks["ntp_server"].startswith("127.0.0.1:")
    (rx,) = clocks["per_receiver"].values()
    assert rx["injected_offset_us"] is not None and rx["synced_fraction"] == 1.0
    assert summary["one_way_delay_us"]["all"]["n"] == 100 * 20
    hold = summary["hold_over_time"]
    assert hold["stamped_per_second"] and all(
        x["hold_us_min"] == x["hold_us_max"] == 20_000 for x in hold["stamped_per_second"]
    )
    assert hold["controller"] and hold["controller"][-1]["hold_ns"] == 20_000_000

    assert set(summary["exit_codes"].values()) == {0}
    assert processes_mentioning(str(out)) == []
    assert processes_mentioning(clocks["reference_dir"]) == []


@pytest.mark.slow
def test_controller_planned_stream_recovers_seeded_loss(tmp_path: Path) -> None:
    """The controller's plan names the publisher's registered port (docs/recovery.md): the
    publisher binds it, the (native) receivers NAK every hole there, and with 5% seeded loss
    on every link and no hedging no pair is lost."""
    out = tmp_path / "demo"
    done = subprocess.run(
        demo_argv(out, "--rate", "100", "--duration", "2", "--hedge", "0", "--loss", "0.05"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["control"] == "controller"
    # (topology.json is the plan before the publisher registered: no port in it yet.)
    assert json.loads((out / "topology.json").read_text())["link_model"]["loss"] == 0.05
    fair = summary["fairness"]
    assert fair["expected_pairs"] == 200 * 20 and fair["lost_pairs"] == 0
    c = summary["counters"]
    # 5% of the root's single copy and of each last hop: ~10% of pairs miss their only copy.
    assert c["naks_sent"] > 0 and c["recovered"] + c["recovered_late"] > 100
    assert c["unrecoverable"] == 0
    assert c["retransmits_sent"] >= c["recovered"] + c["recovered_late"]
