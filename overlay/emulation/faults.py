"""Scheduled faults for an emulation: kill a relay or a receiver host, pause a relay in bursts,
step a node's emulated clock, lose packets on one link; and what each fault cost."""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

FaultKind = Literal["kill-relay", "kill-host", "pause-relay", "clock-step", "link-loss"]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "kill-relay",
    "kill-host",
    "pause-relay",
    "clock-step",
    "link-loss",
)


@dataclass(frozen=True)
class Fault:
    """One fault in a block, at an offset from the block's first message."""

    kind: FaultKind
    """What happens."""
    target: str
    """Node it happens to: a relay ("r1.3"), a receiver host ("h7"), or a link "a->b"."""
    at_s: float
    """Seconds after the block's publisher started sending."""
    bursts: int = 1
    """pause-relay: how many SIGSTOP/SIGCONT bursts."""
    burst_min_ns: int = 300_000
    """pause-relay: shortest pause."""
    burst_max_ns: int = 10_000_000
    """pause-relay: longest pause (durations are log-uniform between the two)."""
    burst_gap_s: float = 0.2
    """pause-relay: time between the starts of two bursts."""
    step_ns: int = 0
    """clock-step: how far the node's emulated clock jumps (signed)."""
    loss: float = 0.0
    """link-loss: probability that a datagram on the link is dropped."""
    duration_s: float = 2.0
    """link-loss: how long the link stays lossy."""
    seed: int = 0
    """Seed of the burst durations."""

    def describe(self) -> str:
        if self.kind == "pause-relay":
            return (
                f"pause {self.target}: {self.bursts} bursts "
                f"{self.burst_min_ns / 1e3:g} µs..{self.burst_max_ns / 1e6:g} ms"
            )
        if self.kind == "clock-step":
            return f"step clock of {self.target} by {self.step_ns / 1e3:+g} µs"
        if self.kind == "link-loss":
            return f"loss {100 * self.loss:g}% on link {self.target} for {self.duration_s:g} s"
        return f"{self.kind} {self.target}"


@dataclass
class FaultEvent:
    """What a fault actually did, stamped with CLOCK_REALTIME (the clock of the records)."""

    fault: Fault
    start_ns: int = 0
    """When it started (kill: the signal; pause: the first SIGSTOP)."""
    end_ns: int = 0
    """When it ended (kill: same as start; pause: the last SIGCONT)."""
    pauses_ns: list[int] = field(default_factory=list)
    """pause-relay: measured length of each burst."""
    pid: int = 0
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.fault.kind,
            "target": self.fault.target,
            "description": self.fault.describe(),
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "pid": self.pid,
            "pauses_us": [round(p / 1e3, 1) for p in self.pauses_ns],
            "error": self.error,
        }


def burst_durations_ns(fault: Fault) -> list[int]:
    """Log-uniform pause lengths between burst_min_ns and burst_max_ns, from the fault's seed."""
    rng = random.Random(fault.seed)
    lo, hi = math.log(fault.burst_min_ns), math.log(fault.burst_max_ns)
    return [int(math.exp(rng.uniform(lo, hi))) for _ in range(fault.bursts)]


def _spin_until(deadline_ns: int) -> None:
    # Sleep most of the way, spin the rest: a 300 µs pause must not become 1 ms.
    while True:
        left = deadline_ns - time.monotonic_ns()
        if left <= 0:
            return
        if left > 200_000:
            time.sleep((left - 150_000) / 1e9)


def _signal(pid: int, sig: int) -> None:
    os.kill(pid, sig)


class FaultInjector:
    """Runs a block's faults on a thread, on the schedule, against the block's processes."""

    def __init__(
        self,
        faults: Sequence[Fault],
        pids: Mapping[str, int],
        *,
        clock_step: Callable[[str, int], None] | None = None,
        link_loss: Callable[[str, str, float], Callable[[], None]] | None = None,
        gates: Mapping[str, NodeGate] | None = None,
        send: Callable[[int, int], None] = _signal,
    ) -> None:
        self.faults = list(faults)
        self.pids = dict(pids)
        self.clock_step = clock_step
        self.link_loss = link_loss
        """Starts loss on link (src, dst) and returns the function that ends it."""
        self.gates = dict(gates or {})
        """Node -> its network gate, closed with the kill or pause of a relay whose copies the
        kernel forwards (NodeGate)."""
        self.send = send
        self.events: list[FaultEvent] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the schedule now (time zero = the block's publisher start)."""
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the schedule to run to its end."""
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _run(self) -> None:
        t0 = time.monotonic()
        for fault in sorted(self.faults, key=lambda f: f.at_s):
            if self._stop.wait(max(0.0, t0 + fault.at_s - time.monotonic())):
                return
            event = FaultEvent(fault)
            try:
                self._apply(fault, event)
            except (OSError, KeyError, RuntimeError) as exc:
                event.error = f"{type(exc).__name__}: {exc}"
            self.events.append(event)

    def _apply(self, fault: Fault, event: FaultEvent) -> None:
        if fault.kind in ("kill-relay", "kill-host"):
            event.pid = self.pids[fault.target]
            event.start_ns = event.end_ns = time.time_ns()
            self.send(event.pid, signal.SIGKILL)
            gate = self.gates.get(fault.target)
            if gate is not None:
                gate.close()
        elif fault.kind == "pause-relay":
            event.pid = self.pids[fault.target]
            gap_ns = int(fault.burst_gap_s * 1e9)
            start = time.monotonic_ns()
            for i, length in enumerate(burst_durations_ns(fault)):
                _spin_until(start + i * gap_ns)
                if self._stop.is_set():
                    break
                t_stop = time.monotonic_ns()
                if i == 0:
                    event.start_ns = time.time_ns()
                gate = self.gates.get(fault.target)
                self.send(event.pid, signal.SIGSTOP)
                if gate is not None:
                    gate.close()
                try:
                    _spin_until(t_stop + length)
                finally:
                    if gate is not None:
                        gate.open()
                    self.send(event.pid, signal.SIGCONT)
                event.pauses_ns.append(time.monotonic_ns() - t_stop)
            event.end_ns = time.time_ns()
        elif fault.kind == "clock-step":
            if self.clock_step is None:
                raise RuntimeError("the data plane offers no way to step a node's clock")
            event.start_ns = event.end_ns = time.time_ns()
            self.clock_step(fault.target, fault.step_ns)
        else:
            if self.link_loss is None:
                raise RuntimeError("no link-loss injector was given")
            src, _, dst = fault.target.partition("->")
            end = self.link_loss(src, dst, fault.loss)
            event.start_ns = time.time_ns()
            try:
                self._stop.wait(fault.duration_s)
            finally:
                end()
                event.end_ns = time.time_ns()


_LINKLOSS_SOURCE = Path(__file__).with_name("linkloss.bpf.c")
_CACHE = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "jasper-emulate"


def _tc(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "tc", *args], capture_output=True, text=True, check=False
    )


def compile_linkloss(src_addr: str, loss: float) -> Path:
    """Compile the link-loss program for one source address and probability (cached by hash)."""
    if not 0.0 <= loss <= 1.0:
        raise ValueError(f"loss must be in 0..1, got {loss}")
    # The address as the u32 the kernel compares: network byte order read in host order.
    addr_u32 = int.from_bytes(ipaddress.IPv4Address(src_addr).packed, sys.byteorder)
    threshold = min(2**32 - 1, int(loss * 2**32))
    return _compile_bpf(
        _LINKLOSS_SOURCE, {"SRC_ADDR": f"{addr_u32}U", "DROP_THRESHOLD": f"{threshold}U"}
    )


def _compile_bpf(source_path: Path, defines: Mapping[str, str]) -> Path:
    """Compile one of the emulation's TC programs with `defines` (cached by source and defines:
    the emulation's own fault programs, not the data path's, which the package build makes)."""
    clang = shutil.which("clang")
    if clang is None:
        raise RuntimeError("clang is needed for the emulation's fault programs (apt install clang)")
    source = source_path.read_bytes()
    flags = [f"-D{k}={v}" for k, v in sorted(defines.items())]
    key = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    _CACHE.mkdir(parents=True, exist_ok=True)
    obj = _CACHE / f"{source_path.name.removesuffix('.bpf.c')}-{key}.o"
    if not obj.exists():
        arch = os.uname().machine
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.run(
            [
                clang, "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}-linux-gnu",
                *flags, "-c", str(source_path), "-o", str(tmp),
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"clang failed on {source_path.name}: {proc.stderr[-500:]}")
        tmp.replace(obj)
    return obj


def attach_linkloss(netns: str, ifname: str, src_addr: str, loss: float) -> Callable[[], None]:
    """Drop packets from `src_addr` arriving on `ifname` in `netns` with probability `loss`,
    until the returned function is called (which removes the filter and the clsact qdisc)."""
    obj = compile_linkloss(src_addr, loss)
    _tc(netns, "qdisc", "add", "dev", ifname, "clsact")
    proc = _tc(
        netns, "filter", "add", "dev", ifname, "ingress", "pref", "7", "bpf", "da",
        "obj", str(obj), "sec", "tc",
    )  # fmt: skip
    if proc.returncode != 0:
        _tc(netns, "qdisc", "del", "dev", ifname, "clsact")
        raise RuntimeError(f"tc could not attach the link-loss program: {proc.stderr.strip()}")

    def detach() -> None:
        _tc(netns, "filter", "del", "dev", ifname, "ingress", "pref", "7")
        # The qdisc goes only when nothing else hangs on it: a relay's fast path may.
        left = _tc(netns, "filter", "show", "dev", ifname, "ingress").stdout.strip()
        left += _tc(netns, "filter", "show", "dev", ifname, "egress").stdout.strip()
        if not left:
            _tc(netns, "qdisc", "del", "dev", ifname, "clsact")

    return detach


_NODEGATE_SOURCE = Path(__file__).with_name("nodegate.bpf.c")
NODEGATE_PREF = 6
"""TC priority of the gate: before the link-loss program (7) and any node's fast path (from
0x4000, ebpf/tc.py), so a closed gate drops a copy before anything forwards it."""


class NodeGate:
    """One emulated host's network, switchable off and on in microseconds.

    A relay on the eBPF fast path forwards in the kernel: SIGKILL or SIGSTOP of its process
    leaves the TC program attached and forwarding, while a dead or paused VM forwards nothing.
    Kill and pause faults close this gate too (the copies that arrive while it is closed are
    dropped: a paused VM would forward them late, after the pause, which its hedged children
    discard as duplicates)."""

    def __init__(self, netns: str, ifname: str = "eth0") -> None:
        from ebpf.libbpf import BpfObject
        from ebpf.netlink import in_netns
        from ebpf.tc import tc_attach

        self.netns = netns
        self.ifname = ifname
        self._obj = BpfObject(_compile_bpf(_NODEGATE_SOURCE, {}))
        self._closed = self._obj.map("nodegate_closed")
        self._dropped = self._obj.map("nodegate_dropped")
        self._ns_fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with in_netns(self._ns_fd):
                tc_attach(ifname, self._obj.prog_fd("node_gate"), "node_gate", [NODEGATE_PREF])
        except BaseException:
            os.close(self._ns_fd)
            self._obj.close()
            raise
        self._attached = True

    def close(self) -> None:
        """Stop the host's network: every packet arriving from now on is dropped."""
        self._closed.update((0).to_bytes(4, "little"), (1).to_bytes(8, "little"))

    def open(self) -> None:
        """Let packets through again."""
        self._closed.update((0).to_bytes(4, "little"), (0).to_bytes(8, "little"))

    def dropped(self) -> int:
        """Packets dropped while closed, so far."""
        return self._dropped.sum_u64(0)

    def remove(self) -> None:
        """Detach the program (idempotent); the host's network works as before."""
        if not self._attached:
            return
        from ebpf.netlink import in_netns
        from ebpf.tc import tc_detach

        self._attached = False
        try:
            with in_netns(self._ns_fd):
                tc_detach(self.ifname, NODEGATE_PREF)
        finally:
            os.close(self._ns_fd)
            self._closed.close()
            self._dropped.close()
            self._obj.close()


@dataclass(frozen=True)
class FaultCost:
    """What one fault block lost: after the fault started, against the same block before it."""

    fault: str
    """Human description."""
    messages: int
    """Messages sent in the block (after warm-up)."""
    messages_before: int
    """Of those, sent before the fault started (the block's own noise floor)."""
    late_pairs_before: int
    """Late pairs among messages sent before the fault started."""
    late_pairs: int
    """Late pairs among messages sent from the fault's start on."""
    lost_pairs: int
    """Lost pairs in the whole block (0 with H >= 1 when one relay dies)."""
    affected_messages: int
    """Messages from the fault's start on with at least one late or lost pair."""
    recovery_ms: float | None
    """From the fault's end to the first of `clean_run` consecutive clean messages; 0 when the
    fault disturbed nothing; None when the block ended before such a run."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "messages": self.messages,
            "messages_before": self.messages_before,
            "late_pairs_before": self.late_pairs_before,
            "late_pairs": self.late_pairs,
            "lost_pairs": self.lost_pairs,
            "affected_messages": self.affected_messages,
            "recovery_ms": self.recovery_ms,
        }


def fault_cost(
    event: FaultEvent,
    send_ns: np.ndarray,
    late: np.ndarray,
    lost: np.ndarray,
    *,
    clean_run: int = 20,
) -> FaultCost:
    """Cost of a fault from the block's pair matrix: send_ns (m,) in send order, late and lost
    (m, e) booleans.

    Endpoints of a killed receiver host are the fault's victims by definition: callers drop
    their columns before asking, and report them separately.
    """
    bad = (late | lost).any(axis=1)
    m = len(send_ns)
    if event.start_ns == 0:
        return FaultCost(
            fault=event.fault.describe(),
            messages=m,
            messages_before=m,
            late_pairs_before=int(late.sum()),
            late_pairs=0,
            lost_pairs=int(lost.sum()),
            affected_messages=0,
            recovery_ms=None,
        )
    first = int(np.searchsorted(send_ns, event.start_ns))
    recovery: float | None = None
    end_ns = max(event.end_ns, event.start_ns)
    for i in range(first, max(first, m - clean_run + 1)):
        if not bad[i : i + clean_run].any():
            recovery = 0.0 if i == first else max(0.0, float(send_ns[i] - end_ns) / 1e6)
            break
    return FaultCost(
        fault=event.fault.describe(),
        messages=m,
        messages_before=first,
        late_pairs_before=int(late[:first].sum()),
        late_pairs=int(late[first:].sum()),
        lost_pairs=int(lost[first:].sum()) + int(lost[:first].sum()),
        affected_messages=int(bad[first:].sum()),
        recovery_ms=recovery,
    )
