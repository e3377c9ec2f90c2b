"""Emulation: the clock-step fault (hook, reference chronyd, cost), the calibrated tau and the
P(F) table at several tau."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from jasper.records import DELIVERY_DTYPE, SENT_DTYPE
from overlay.clocks import SoftwareClock
from overlay.clocksync import ClockDiscipline, ClockService
from overlay.emulation.faults import Fault, FaultEvent
from overlay.emulation.netns import EmulatedNetwork, list_namespaces
from overlay.emulation.report import (
    ConfigResult,
    config_fairness,
    format_pfair_table,
    p_fair_columns,
    pair_matrix,
    table_taus_us,
)
from overlay.emulation.runner import clock_step_cost, nice_ceil_ns
from overlay.refclock import chronyd_path
from tests.conftest import can_netns, require_privileged

# --- the step hook ---------------------------------------------------------------------------


def test_sigusr1_steps_the_emulated_clock_by_the_file_and_keeps_its_bound(tmp_path: Path) -> None:
    step_file = tmp_path / "step"

    async def main() -> tuple[int, int, object, object, list[tuple[int, int]]]:
        svc = ClockService.emulated(offset_ns=0, drift_ppm=0.0, server=None, name="h1")
        svc.step_file = str(step_file)
        await svc.start()
        bound_before = svc.clock.bound()
        before = svc.now_ns() - time.time_ns()
        step_file.write_text("-7000000\n")
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(200):  # the loop runs the handler on its next turn
            await asyncio.sleep(0.01)
            if svc.steps:
                break
        after = svc.now_ns() - time.time_ns()
        bound_after = svc.clock.bound()
        await svc.stop()
        return before, after, bound_before, bound_after, svc.steps

    before, after, b0, b1, steps = asyncio.run(main())
    assert [s for _, s in steps] == [-7_000_000]
    assert abs(before) < 1_000_000
    assert after - before == pytest.approx(-7_000_000, abs=1_000_000)
    # A fault, not a correction: the clock still claims the bound it had.
    assert b1 == b0
    # The handler is gone after stop(): SIGUSR1 has its default action again.
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)


def test_the_system_clock_cannot_be_stepped() -> None:
    svc = ClockService.system()
    with pytest.raises(TypeError):
        svc.step(1000)


@pytest.mark.privileged
def test_reference_chronyd_in_a_namespace_corrects_a_stepped_clock(tmp_path: Path) -> None:
    """The fault's whole path: a reference chronyd in one namespace, a node clock stepped
    10 ms behind, and the node's next SNTP burst against the reference undoing the step."""
    require_privileged("root with network namespaces", can_netns())
    require_privileged("chronyd", chronyd_path() is not None)
    from overlay.emulation.netns import enter
    from overlay.emulation.timeref import TimeReference

    tag = f"tc{os.getpid() % 10000}"
    net = EmulatedNetwork(tag=tag)
    ref_host, node_host = net.add_host("ctl"), net.add_host("h0")
    ref = TimeReference(
        netns=ref_host.netns, addr=ref_host.addr, subnet=net.subnet, workdir=tmp_path / "ref"
    )
    errors: list[int] = []
    failure: list[BaseException] = []
    try:
        net.build()
        ref.start()
        assert ref.ping()

        step_file = tmp_path / "clock-step"

        async def node() -> None:
            svc = ClockService.emulated(
                offset_ns=3_000_000, drift_ppm=0.0, server=(ref.addr, 123), name="h0"
            )
            svc.step_file = str(step_file)
            assert isinstance(svc.sync, ClockDiscipline)
            assert isinstance(svc.clock, SoftwareClock)
            await svc.start()  # the start-up correction (3 ms off -> near 0), then every 1 s
            errors.append(svc.clock.error_ns())
            svc.step(-10_000_000)
            errors.append(svc.clock.error_ns())
            done = Path(str(step_file) + ".corrected")
            for _ in range(1000):  # the next burst measures the jump and undoes it
                if done.exists():
                    break
                await asyncio.sleep(0.01)
            errors.append(svc.clock.error_ns())
            await svc.stop()

        def in_node_ns() -> None:
            try:
                enter(node_host.netns)
                asyncio.run(node())
            except BaseException as exc:  # surfaced below
                failure.append(exc)

        import threading

        t = threading.Thread(target=in_node_ns)
        t.start()
        t.join(60)
        assert not t.is_alive()
        if failure:
            raise failure[0]
    finally:
        ref.stop()
        net.teardown()
    assert list_namespaces(f"jemu-{tag}-") == []
    synced, stepped, corrected = errors
    # Generous margins: SNTP on a loaded 2-core machine is good to a fraction of a ms here.
    assert abs(synced) < 1_000_000
    assert stepped == pytest.approx(synced - 10_000_000, abs=500_000)
    assert abs(corrected) < 1_000_000
    # The daemon's own account of the correction, which the fault's cost reads.
    report = json.loads((tmp_path / "clock-step.corrected").read_text())
    assert report["step_ns"] == -10_000_000
    assert 0 < report["corrected_at_ns"] - report["stepped_at_ns"] < 5_000_000_000
    assert report["measured_offset_ns"] == pytest.approx(10_000_000, abs=1_000_000)
    assert abs(report["error_after_ns"]) < 1_000_000


# --- cost of a step, calibrated tau, the table -----------------------------------------------


def _records(release_offsets: dict[tuple[int, str], int]) -> tuple[np.ndarray, np.ndarray]:
    """Four messages to e0, e1, every copy on time; release = deadline + offset."""
    sent = np.zeros(4, dtype=SENT_DTYPE)
    sent["stream_id"] = 1
    sent["session"] = 3
    sent["seq"] = [1, 2, 3, 4]
    sent["send_time_ns"] = [10**9 * k for k in range(1, 5)]
    sent["deadline_ns"] = sent["send_time_ns"] + 1_000_000
    rows = []
    for s in sent:
        for e in ("e0", "e1"):
            deadline = int(s["deadline_ns"])
            release = deadline + release_offsets.get((int(s["seq"]), e), 0)
            rows.append((e, 1, 3, int(s["seq"]), deadline - 500_000, release, deadline, "r", True))
    return sent, np.array(rows, dtype=DELIVERY_DTYPE)


def test_clock_step_cost_counts_the_stepped_hosts_mistimed_releases() -> None:
    # e1's host stepped 10 ms behind just before message 2; its next SNTP burst fixed it
    # before message 4.
    sent, deliv = _records({(2, "e1"): 10_000_000, (3, "e1"): 10_000_000, (1, "e0"): 20_000})
    m = pair_matrix(sent, deliv, ["e0", "e1"])
    step_at = int(sent["send_time_ns"][1]) - 1
    event = FaultEvent(Fault(kind="clock-step", target="h1", at_s=0), step_at, step_at)
    victims = np.array([False, True])
    cost = clock_step_cost(m, victims, event, tau_ns=100_000)
    assert cost["mistimed"].tolist() == [[False, False], [False, True], [False, True], [False] * 2]
    assert cost["victim_mistimed_pairs"] == 2
    assert cost["victim_release_error_max_us"] == pytest.approx(10_000.0)
    # Wrong from the step to the last mistimed release (message 3's, 10 ms late).
    assert cost["last_mistimed_ms"] == pytest.approx(1000 + 1 + 10, abs=0.1)
    # Against the block's other host: 2 per endpoint after the step there, none elsewhere.
    assert cost["victim_mistimed_per_endpoint"] == 2.0
    assert cost["others_mistimed_per_endpoint"] == 0.0


def test_nice_ceil_rounds_up_to_1_2_5() -> None:
    assert [nice_ceil_ns(x) // 1000 for x in (1, 90_000, 100_000, 101_000, 1_900_000)] == [
        10,
        100,
        100,
        200,
        2000,
    ]
    assert nice_ceil_ns(4_200_000) == 5_000_000
    assert nice_ceil_ns(7_000_000) == 10_000_000


def test_table_shows_pfair_at_several_tau_with_n_and_intervals() -> None:
    assert table_taus_us(5000) == [1000, 3000, 5000, 10000, 30000]
    assert table_taus_us(100) == [10, 30, 100, 300, 1000]
    # DWS of the four messages: 20 µs, 0, 0, 0 -> P(F) 3/4 at 10 µs, 4/4 from 30 µs.
    sent, deliv = _records({(1, "e0"): 20_000})
    fair = config_fairness(sent, deliv, ["e0", "e1"], stream_id=1, has_deadline=True, tau_ns=0)
    c = ConfigResult(
        name="jasper",
        description="",
        has_deadline=True,
        fairness=fair,
        matrix=pair_matrix(sent, deliv, ["e0", "e1"]),
        blocks=1,
        offered_rate=1,
        achieved_rate=1,
        cpu_fraction=0,
    )
    cols = p_fair_columns(c, [10, 30])
    assert [x["p_fair"] for x in cols] == [0.75, 1.0]
    assert all(x["n"] == 4 and x["ci"][0] <= x["p_fair"] <= x["ci"][1] for x in cols)
    text = format_pfair_table([{"config": "jasper", "messages": 4, "p_fair_at": cols}], 30)
    assert "*tau 0.03 ms" in text and "75.0% [" in text and "100.0% [" in text


def test_correction_report_skips_a_burst_begun_before_the_step(tmp_path: Path) -> None:
    """A burst already running when the clock steps sampled the old clock: the report waits
    for the first burst begun after the step (seen at N=1000: 'corrected' after 12 ms, 0.6 µs)."""
    from overlay.clocksync import SyncRecord

    async def main() -> dict[str, int]:
        svc = ClockService.emulated(
            offset_ns=0, drift_ppm=0.0, server=("127.0.0.1", 9), name="h0"
        )  # never started: the test feeds the discipline's history itself
        assert isinstance(svc.sync, ClockDiscipline)
        svc.step_file = str(tmp_path / "clock-step")
        history = svc.sync.history
        before = time.time_ns()
        svc.step(-10_000_000)
        await asyncio.sleep(0.02)
        history.append(SyncRecord(0, 600, 1, 1, 8, burst_started_true_ns=before))
        await asyncio.sleep(0.05)
        assert not (tmp_path / "clock-step.corrected").exists()
        history.append(SyncRecord(0, 10_000_000, 1, 1, 8, burst_started_true_ns=time.time_ns()))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if (tmp_path / "clock-step.corrected").exists():
                break
        await svc.stop()
        doc: dict[str, int] = json.loads((tmp_path / "clock-step.corrected").read_text())
        return doc

    doc = asyncio.run(main())
    assert doc["measured_offset_ns"] == 10_000_000
    assert doc["step_ns"] == -10_000_000
