"""`jasper demo` end to end: real processes, a report, records, a clean stop (also on Ctrl-C).

The controller path's own run is in test_demo_controller.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (the run's unique output folder)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd:
            pids.append(int(entry))
    return pids


def demo_argv(out: Path, *extra: str) -> list[str]:
    """A small `jasper demo` (20 endpoints in one receiver process, F=5, H=2)."""
    return [
        sys.executable, "-m", "jasper_cli.main", "demo",
        "--receivers", "20", "--fanout", "5", "--hold-us", "20000",
        "--output", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_demo_runs_reports_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run(
        demo_argv(
            out, "--control", "static", "--rate", "50", "--duration", "2", "--cpu-wakeup-us", "0"
        ),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    for needle in (
        "P(F)",
        "OML",
        "DWS",
        "release error",
        "late pairs",
        "lost pairs",
        "duplicates dropped",
        "offered 50 msg/s",
        "CPU used",
        "peak_rss",
    ):
        assert needle in text, needle
    assert "[####" in done.stderr  # the progress bar
    summary = json.loads((out / "summary.json").read_text())
    fair = summary["fairness"]
    assert fair["messages"] == 100 and fair["lost_pairs"] == 0
    assert fair["expected_pairs"] == 100 * 20
    assert summary["counters"]["endpoints_with_h_plus_1_parents"] == 20
    assert summary["counters"]["duplicates_dropped_endpoints"] == 100 * 20 * 2
    assert set(summary["exit_codes"].values()) == {0}
    assert len(np.load(out / "sent.npy")) == 100
    assert (out / "topology.json").exists() and (out / "report.txt").exists()
    assert processes_mentioning(str(out)) == []
    assert summary["control"] == "static" and summary["tree"] is None
    assert "static topology file" in text
    # Every node ran its own skewed clock, corrected against the demo's reference chronyd.
    clocks = summary["clocks"]
    assert clocks["emulated"] and clocks["corrected"] and clocks["ntp_server"]
    assert processes_mentioning(clocks["reference_dir"]) == []
    assert not Path(clocks["reference_dir"]).exists()
    (rx,) = clocks["per_receiver"].values()
    assert rx["injected_offset_us"] is not None and rx["synced_fraction"] == 1.0
    # The receivers held the CPU wake-up request they were given (root here; see
    # test_cpu_wakeup.py for what it does).
    (status,) = [json.loads(p.read_text()) for p in out.glob("status-receiver-*.json")]
    if os.geteuid() == 0:
        assert status["cpu_wakeup_us"] == 0


@pytest.mark.slow
def test_demo_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        demo_argv(out, "--rate", "20", "--duration", "60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a shell job
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "progress").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)
        assert len(processes_mentioning(str(out))) >= 3
        # Ctrl-C in a terminal: SIGINT to the whole process group, children included.
        os.killpg(proc.pid, signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    assert processes_mentioning(str(out)) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["control"] == "controller"  # the default path, controller stopped too
    assert processes_mentioning(summary["clocks"]["reference_dir"]) == []
    assert 0 < summary["fairness"]["messages"] < 1200
    assert summary["fairness"]["lost_pairs"] == 0
    assert set(summary["exit_codes"].values()) == {0}  # every daemon stopped by itself
