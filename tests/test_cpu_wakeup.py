"""The CPU wake-up latency request (PM QoS): held while a receiver runs, dropped when it closes."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overlay.kernel import CPU_DMA_LATENCY, CpuWakeupLatency
from tests.conftest import require_privileged

CPUIDLE = Path("/sys/devices/system/cpu")


def pm_qos_available() -> bool:
    return os.geteuid() == 0 and os.access(CPU_DMA_LATENCY, os.R_OK | os.W_OK)


def latency_in_force() -> int:
    """What the kernel holds now: the lowest of all open requests (µs)."""
    with open(CPU_DMA_LATENCY, "rb") as f:
        value: int = struct.unpack("=i", f.read(4))[0]
    return value


def halting_entries() -> int:
    """How often CPUs entered an idle state slower to leave than 0 µs (e.g. a VM's halt)."""
    total = 0
    for state in CPUIDLE.glob("cpu[0-9]*/cpuidle/state[0-9]*"):
        if int((state / "latency").read_text()) > 0:
            total += int((state / "usage").read_text())
    return total


@pytest.fixture()
def pm_qos() -> None:
    require_privileged("root with /dev/cpu_dma_latency", pm_qos_available())


def test_request_is_in_force_while_held_and_gone_after_close(pm_qos: None) -> None:
    before = latency_in_force()
    assert before > 0, "another process holds a 0 µs request; this test needs it free"
    request = CpuWakeupLatency(0)
    try:
        assert request.held and request.error is None
        assert latency_in_force() == 0
    finally:
        request.close()
    assert latency_in_force() == before
    request.close()  # a second close is harmless


def test_idle_cpus_stop_halting_while_held(pm_qos: None) -> None:
    """The point of the request: with it, idle CPUs take no idle state slower than 0 µs."""
    if halting_entries() == 0 and not any(CPUIDLE.glob("cpu0/cpuidle/state1")):
        pytest.skip("no cpuidle states with an exit latency here: nothing to keep CPUs out of")
    base = halting_entries()
    time.sleep(0.3)
    assert halting_entries() > base, "idle CPUs should halt at all without the request"
    request = CpuWakeupLatency(0)
    try:
        time.sleep(0.05)  # a CPU already halted when the request came wakes at its next tick
        held_from = halting_entries()
        time.sleep(0.3)
        entered = halting_entries() - held_from
    finally:
        request.close()
    assert entered <= 2, f"{entered} entries into a halting idle state while 0 µs was held"


def test_unavailable_device_is_reported_not_raised(tmp_path: Path) -> None:
    request = CpuWakeupLatency(0, path=str(tmp_path / "missing"))
    assert not request.held
    assert request.error is not None and "missing" in request.error
    request.close()


def test_negative_latency_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        CpuWakeupLatency(-1)


def test_receiver_holds_the_request_from_start_to_close(pm_qos: None) -> None:
    from jasper.layout import ports_needed, topology_from_plan
    from jasper.tree import tree_shape
    from overlay.launch import free_port_base
    from overlay.receiver import Receiver

    plan = tree_shape(2, fanout=2, hedge=0)
    base = free_port_base("127.0.0.1", ports_needed(plan))
    topo = topology_from_plan(plan, addr="127.0.0.1", port_base=base, endpoints_per_receiver=2)
    before = latency_in_force()

    async def run() -> dict[str, object]:
        rx = Receiver(topo, "h0", link_model=False, realtime=False, cpu_wakeup_us=0)
        assert latency_in_force() == before, "asked for before the receiver runs"
        rx.start()
        try:
            assert latency_in_force() == 0
            status: dict[str, object] = rx.status()
        finally:
            rx.stop()
            rx.close()
        return status

    status = asyncio.run(run())
    assert status["cpu_wakeup_us"] == 0
    assert latency_in_force() == before


def test_cli_refuses_a_negative_wakeup_latency() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "jasper_cli.main", "receiver", "--topology", "x.json",
         "--node-name", "h0", "--cpu-wakeup-us", "-5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--cpu-wakeup-us must be >= 0 µs (got -5)" in proc.stderr
