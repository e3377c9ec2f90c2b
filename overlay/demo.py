"""The single-host demo: plan a tree, run it as real processes, and report its fairness."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jasper.records import Releases, message_offsets
from jasper.recovery import RECOVERY_COUNTER_NAMES
from overlay.common import write_json
from overlay.launch import Child, Cluster, free_port_base, jasper_argv
from overlay.report_page import data_path_per_node, data_paths

if TYPE_CHECKING:
    from controller.loopback import LoopbackController
    from jasper.metrics import FairnessFigures

DEMO_LINK_MODEL: dict[str, Any] = {
    "seed": 1,
    "median_ns": 40_000,
    "p99_ns": 120_000,
    "spike_prob": 0.001,
    "spike_min_ns": 300_000,
    "spike_max_ns": 1_500_000,
    "loss": 0.0,
    "lemon_fraction": 0.05,
    "lemon_factor": 2.0,
}
"""An in-region cloud link: ~40 µs median one way, a long tail, rare stalls, a few lemons."""


@dataclass(frozen=True)
class DemoConfig:
    """What `jasper demo` runs."""

    receivers: int = 100
    """Endpoints N (leaves of the tree)."""
    fanout: int = 10
    """Fan-out F."""
    hedge: int = 2
    """Sibling hedging H."""
    rate: float = 100.0
    """Offered messages per second."""
    duration_s: float = 10.0
    """Publishing time in seconds."""
    hold_ns: int = 5_000_000
    """deadline − send time, in nanoseconds."""
    batch_ns: int = 0
    """Publisher batch window in nanoseconds (0: one message per datagram)."""
    tau_ns: int = 50_000
    """DWS threshold of P(F), in nanoseconds."""
    warmup_messages: int = 0
    """Messages left out of the statistics at the start."""
    link_model: Mapping[str, Any] | None = None
    """Link model document (None = off)."""
    endpoints_per_receiver: int = 20
    """Endpoints hosted by one receiver process."""
    relays_per_process: int = 6
    """Relay nodes hosted by one relay process (the root runs alone)."""
    addr: str = "127.0.0.1"
    """Loopback address every node binds."""
    drain_s: float = 10.0
    """After the last message, stop once no endpoint has accepted anything for this long, in
    seconds; normally the run stops as soon as every pair is accepted."""
    fast_path: str = "auto"
    """--fast-path for relays and receivers."""
    datapath: str = "auto"
    """--datapath for receivers: native, python, or auto (native where built)."""
    realtime: bool = True
    """Run relays' and receivers' event loops (and release threads) in SCHED_FIFO."""
    cpu_wakeup_us: int | None = None
    """Receivers ask that idle CPUs wake within this many µs while they run (None: not asked)."""
    deliver: str = "memory"
    """memory: hand messages over in process; udp: send each to a local UDP port per endpoint."""
    control: str = "controller"
    """controller: a loopback controller plans the tree and MPs subscribe over REST;
    static: the demo writes a topology file itself."""
    hold_policy: str = "fixed"
    """Controller path: fixed, or adaptive (the controller's deadline policy moves the hold)."""
    emulate_clocks: bool = True
    """Give every process its own software clock with a seeded injected skew."""
    clock_skew_us: float = 500.0
    """Injected clock offsets are drawn uniformly from ±this, in µs."""
    clock_drift_ppm: float = 20.0
    """Injected clock drifts are drawn uniformly from ±this, in ppm."""
    clock_sync: bool = True
    """Correct the emulated clocks by SNTP (False: the negative control)."""
    clock_seed: int = 1
    """Seed of the injected offsets and drifts."""
    ntp_server: str | None = None
    """HOST:PORT to correct clocks against; None starts a reference chronyd on loopback."""
    link_steps: tuple[tuple[float, float], ...] = ()
    """Step changes of the link model, (seconds after the first message, scale of every
    delay of `link_model`), applied through the controller's PUT /v1/emulation/link-model,
    in time order; (12.0, 1.0) goes back to the starting model."""
    hold_objective: float = 0.01
    """Controller path: the deadline policy's lateness objective (fraction of one endpoint's
    messages late per window)."""


LINK_DELAY_FIELDS = ("median_ns", "p99_ns", "spike_min_ns", "spike_max_ns")
"""The link model's delay fields, which a step scales (loss, lemons and seed stay)."""


def scaled_link_model(base: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """`base` with every delay multiplied by `scale` (a step change in the link model)."""
    if scale <= 0:
        raise ValueError(f"link step scale must be > 0, got {scale}")
    return {k: (max(1, round(v * scale)) if k in LINK_DELAY_FIELDS else v) for k, v in base.items()}


TAU_LADDER_NS = (100_000, 500_000, 1_000_000)
"""Further DWS thresholds the report gives P(F) at (ns)."""


class _Interrupted(Exception):
    pass


def _progress_bar(done: int, total: int, elapsed: float, duration: float) -> str:
    width = 30
    frac = 0.0 if total <= 0 else min(1.0, done / total)
    fill = int(frac * width)
    return (
        f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} msgs  "
        f"{min(elapsed, duration):5.1f}/{duration:.1f} s"
    )


def _port_block(addr: str, count: int) -> int:
    """Base of `count` consecutive free UDP ports below the kernel's ephemeral range.

    The controller path binds its ports a minute or more after choosing them (1,000 MPs
    subscribe first); in the ephemeral range, sockets of other processes on the host (probes,
    clients) would take some of them meanwhile.
    """
    import random
    import socket

    try:
        low_eph = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low_eph = 32768
    low, high = 10000, low_eph - count
    if high <= low:
        return free_port_base(addr, count)
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(low, high)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(sock)
                sock.bind((addr, port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    return free_port_base(addr, count)


def node_clocks(cfg: DemoConfig, names: list[str]) -> dict[str, tuple[float, float]]:
    """Seeded (offset µs, drift ppm) per process label; empty when clocks are not emulated."""
    if not cfg.emulate_clocks:
        return {}
    import random

    rng = random.Random(cfg.clock_seed)
    return {
        n: (
            rng.uniform(-cfg.clock_skew_us, cfg.clock_skew_us),
            rng.uniform(-cfg.clock_drift_ppm, cfg.clock_drift_ppm),
        )
        for n in names
    }


class _Run:
    """What one demo run started, so that every exit path stops all of it."""

    def __init__(self, cfg: DemoConfig, out: Path) -> None:
        self.cfg = cfg
        self.out = out
        self.cluster = Cluster(out / "topology.json", out)
        self.ref: Any = None
        self.ctl: Any = None
        self.ntp_server: str | None = None
        self.clocks: dict[str, tuple[float, float]] = {}
        self.clock_note = ""
        self.tree: dict[str, Any] | None = None
        self.hosts: dict[str, list[str]] = {}
        """Receiver process -> its endpoint names."""
        self.subscriptions: dict[int, list[str]] = {}
        self.samples: list[dict[str, Any]] = []
        """Controller readings during the run: time, stream hold, node clocks."""
        self.hold_doc: dict[str, Any] | None = None
        """The controller's last GET /v1/streams/1/hold: hold in force and every window."""
        self.t0_wall_ns: int | None = None
        """Kernel clock when the publisher was started: time zero of the step report."""
        self.steps_applied: list[dict[str, Any]] = []
        """Link-model steps as applied: requested and actual time, scale, model."""
        self.sinks: list[Any] = []
        """UDP sockets standing in for MP applications (deliver=udp)."""
        self.mp_received = 0
        """Datagrams the MP sockets received (deliver=udp)."""
        self.link_model_note = ""
        self.prefix: list[str] = []
        """Command prefix of controller-mode daemons (chrt, see REALTIME_AT_EXEC_MAX)."""
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        self._stepper: threading.Thread | None = None
        self.publishing = threading.Event()
        """Set once the publisher reported its first message."""
        self.publish_t0 = 0.0
        """time.monotonic() when the first message was seen to go out."""

    def clock_args(self, label: str) -> tuple[str, ...]:
        if label not in self.clocks:
            return ()
        off, drift = self.clocks[label]
        argv: tuple[str, ...] = (
            "--clock-offset-us",
            f"{off:.3f}",
            "--clock-drift-ppm",
            f"{drift:.3f}",
        )
        if self.ntp_server:
            argv += ("--ntp-server", self.ntp_server)
        return argv

    def start_clock_reference(self, stream: Any) -> None:
        cfg = self.cfg
        if not (cfg.emulate_clocks and cfg.clock_sync):
            return
        if cfg.ntp_server:
            self.ntp_server = cfg.ntp_server
            return
        from overlay.refclock import ChronyConfig, ReferenceChrony, chronyd_path

        if chronyd_path() is None:
            self.clock_note = "chronyd not found: emulated clocks run uncorrected"
            print(f"jasper demo: {self.clock_note}", file=stream)
            return
        # -t: chronyd exits by itself even if this process dies without cleaning up.
        ttl = int(cfg.duration_s + 600)
        self.ref = ReferenceChrony(ChronyConfig(exit_after_s=ttl)).start()
        self.ntp_server = f"127.0.0.1:{self.ref.ntp_port}"

    def sample_controller(self, t0: float) -> None:
        """One reading of the hold in force and every node's clock from the controller."""
        if self.ctl is None:
            return
        with contextlib.suppress(Exception):
            try:
                # The hold in force (adaptive policy) where the controller serves it.
                hold = self.ctl.call("GET", "/v1/streams/1/hold")
                self.hold_doc = hold
            except Exception:
                hold = self.ctl.call("GET", "/v1/streams/1")
            nodes = self.ctl.nodes()
            self.samples.append(
                {
                    "t_s": round(time.monotonic() - t0, 2),
                    "hold_ns": hold.get("hold_ns"),
                    "hold_policy": hold.get("hold_policy"),
                    "clocks": {n["name"]: n.get("clock") for n in nodes},
                }
            )

    def start_sampler(self, t0: float) -> None:
        """Read the controller once a second in a thread (REST calls slow down on a busy host,
        and the progress bar must not wait for them)."""
        if self.ctl is None:
            return

        def loop() -> None:
            while not self._sampling.wait(1.0):
                self.sample_controller(t0)

        self._sampler = threading.Thread(target=loop, name="controller-sampler", daemon=True)
        self.sample_controller(t0)
        self._sampler.start()

    def publishing_started(self) -> None:
        """The publisher's first message went out: time zero of the link steps."""
        if not self.publishing.is_set():
            self.publish_t0 = time.monotonic()
            self.publishing.set()

    def start_link_steps(self) -> None:
        """Apply the configured link-model steps at their times after the first message, in
        a thread, through the controller (every relay and receiver takes the new model with
        its next config). Timed from the first message, not the publisher's start: on a busy
        host a publisher can take tens of seconds to register and correct its clock."""
        cfg = self.cfg
        if not cfg.link_steps or self.ctl is None or not cfg.link_model:
            return
        base = dict(cfg.link_model)

        def loop() -> None:
            while not self.publishing.wait(0.1):
                if self._sampling.is_set():
                    return
            t0 = self.publish_t0
            for at_s, scale in cfg.link_steps:
                if self._sampling.wait(max(0.0, t0 + at_s - time.monotonic())):
                    return
                model = scaled_link_model(base, scale)
                entry: dict[str, Any] = {"at_s": at_s, "scale": scale, "model": model}
                try:
                    self.ctl.call("PUT", "/v1/emulation/link-model", json=model)
                    entry["applied_s"] = round(time.monotonic() - t0, 3)
                    entry["applied_wall_ns"] = time.time_ns()
                except Exception as exc:  # reported, the run goes on
                    entry["error"] = str(exc)
                self.steps_applied.append(entry)

        self._stepper = threading.Thread(target=loop, name="link-steps", daemon=True)
        self._stepper.start()

    def stop_sampler(self) -> None:
        self._sampling.set()
        for attr in ("_sampler", "_stepper"):
            thread = getattr(self, attr)
            if thread is not None:
                thread.join(15)
                setattr(self, attr, None)

    def drain_sinks(self) -> None:
        """Read what the MPs' sockets hold, as the MP applications would (deliver=udp)."""
        for sock in self.sinks:
            while True:
                try:
                    sock.recv(2048)
                except (BlockingIOError, InterruptedError):
                    break
                self.mp_received += 1

    def close(self) -> None:
        self.stop_sampler()
        try:
            self.cluster.stop()
        finally:
            try:
                if self.ctl is not None:
                    self.ctl.close()
            finally:
                if self.ref is not None:
                    self.ref.cleanup()
                self.drain_sinks()  # the receivers released their last messages as they stopped
                for sock in self.sinks:
                    sock.close()


def run_demo(cfg: DemoConfig, out: Path, *, stream: Any = sys.stderr) -> dict[str, Any]:
    """Run the demo, write records and summary.json into `out`, return the summary."""
    from jasper.tree import default_depth, hedged_shape, tree_shape

    out.mkdir(parents=True, exist_ok=True)
    # A small N would get the paper's one-level tree, where hedging cannot reach a leaf.
    fanout, depth = hedged_shape(cfg.receivers, fanout=cfg.fanout, hedge=cfg.hedge)
    plan = tree_shape(cfg.receivers, fanout=fanout, hedge=cfg.hedge, depth=depth)
    if depth != default_depth(cfg.receivers, cfg.fanout):
        print(
            f"jasper demo: {cfg.receivers} endpoints: depth {depth} instead of the paper's "
            f"round(log_F N) = 1, so that the H={cfg.hedge} hedge copies reach the endpoints "
            + ("" if fanout == cfg.fanout else f"(fan-out {fanout} on a static plan)"),
            file=stream,
        )
    run = _Run(cfg, out)
    interrupted = False
    startup_s: float | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        raise _Interrupted(signum)

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        run.start_clock_reference(stream)
        if cfg.control == "static":
            publisher_argv = _start_static(run, plan, stream)
        else:
            publisher_argv = _start_controlled(run, plan, stream)
        startup_s = time.monotonic() - started
        total = int(cfg.rate * cfg.duration_s)
        progress_file = out / "progress"
        progress_file.unlink(missing_ok=True)  # a stale one would start the link steps early
        pub = run.cluster._spawn(
            Child(
                "publisher",
                "publisher",
                run.prefix
                + jasper_argv(
                    "publisher",
                    *publisher_argv,
                    "--records",
                    str(out),
                    "--rate",
                    str(cfg.rate),
                    "--duration",
                    str(cfg.duration_s),
                    "--batch-us",
                    str(cfg.batch_ns / 1000),
                    *(("--realtime",) if cfg.realtime else ()),
                    *run.clock_args("publisher"),
                ),
                run.cluster.log_dir / "publisher.log",
            )
        )
        if cfg.realtime and cfg.control != "static" and not run.prefix:
            make_loops_realtime([pub])
        t0 = time.monotonic()
        run.t0_wall_ns = time.time_ns()
        run.start_sampler(t0)
        run.start_link_steps()
        done = 0
        assert pub.proc is not None
        while pub.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                # max: a read can catch the file half-written (empty).
                done = max(done, int(progress_file.read_text() or 0))
            if done > 0:
                run.publishing_started()
            stream.write(_progress_bar(done, total, time.monotonic() - t0, cfg.duration_s))
            stream.flush()
            run.drain_sinks()
            time.sleep(0.2)
        stream.write(_progress_bar(total, total, cfg.duration_s, cfg.duration_s) + "\n")
        _drain(out, cfg, sum(len(v) for v in run.subscriptions.values()), stream)
        run.drain_sinks()
        run.stop_sampler()
        run.sample_controller(t0)
    except _Interrupted:
        interrupted = True
        stream.write("\ninterrupted: stopping every process\n")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if run.tree is None and run.ctl is not None:
                with contextlib.suppress(Exception):
                    run.tree = run.ctl.tree(1)
            run.close()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    summary, figures = summarize_with_figures(out, run.subscriptions, cfg, run=run)
    summary["startup_s"] = startup_s
    summary["interrupted"] = interrupted
    if cfg.deliver == "udp":
        summary["mp_received"] = run.mp_received
        summary["text"] += f"\nMP sockets received {run.mp_received} datagrams"
    summary["exit_codes"] = {
        c.name: (c.proc.returncode if c.proc is not None else None) for c in run.cluster.children
    }
    from overlay.report_page import write_demo_report

    summary["report_html"] = str(out / "report.html")
    write_json(out / "summary.json", summary)
    (out / "report.txt").write_text(summary["text"] + "\n")
    write_demo_report(out, summary, figures)
    return summary


def _start_static(run: _Run, plan: Any, stream: Any) -> tuple[str, ...]:
    """Write the topology file, start relays and receivers on it; the publisher's arguments."""
    from jasper.layout import ports_needed, relay_groups, topology_from_plan
    from jasper.topology import StreamAuth

    cfg, out = run.cfg, run.out
    n_ports = ports_needed(plan)
    deliver_ports = cfg.receivers if cfg.deliver == "udp" else 0
    # One more port: the publisher's, where receivers send NAKs (docs/recovery.md).
    base = _port_block(cfg.addr, n_ports + deliver_ports + 1)
    topo = topology_from_plan(
        plan,
        addr=cfg.addr,
        port_base=base,
        endpoints_per_receiver=cfg.endpoints_per_receiver,
        hold_ns=cfg.hold_ns,
        link_model=cfg.link_model,
        deliver_port_base=base + n_ports if cfg.deliver == "udp" else None,
        # Without a controller the demo issues the stream key itself (in topology.json).
        auth=StreamAuth.fresh(),
    )
    pub_port = base + n_ports + deliver_ports
    topo = dataclasses.replace(topo, publisher=dataclasses.replace(topo.publisher, port=pub_port))
    topo_path = out / "topology.json"
    write_json(topo_path, topo.to_dict())
    groups = relay_groups(plan, cfg.relays_per_process)
    run.hosts = {h.name: [e.name for e in h.endpoints] for h in topo.receivers}
    run.subscriptions = topo_subscriptions(topo)
    labels = [f"relay-{g[0]}" for g in groups] + [f"receiver-{h}" for h in run.hosts]
    run.clocks = node_clocks(cfg, [*labels, "publisher"])
    _announce(run, plan.depth, len(plan.relays()), len(groups), len(run.hosts), stream)
    fp = ("--fast-path", cfg.fast_path, "--status-interval", "1.0")
    for g in groups:
        run.cluster.add_relay(
            g, *fp, *(("--realtime",) if cfg.realtime else ()), *run.clock_args(f"relay-{g[0]}")
        )
    rx_extra: tuple[str, ...] = (
        "--deliver",
        "topology" if cfg.deliver == "udp" else "memory",
        "--datapath",
        cfg.datapath,
    )
    if not cfg.realtime:
        rx_extra += ("--no-realtime",)
    rx_extra += _wakeup_args(cfg)
    if cfg.deliver == "udp":
        run.sinks = _open_sinks(cfg.addr, base + n_ports, cfg.receivers)
    for h in run.hosts:
        run.cluster.add_receiver(h, *fp, *rx_extra, *run.clock_args(f"receiver-{h}"))
    run.cluster.wait_ready(timeout_s=max(120.0, 0.5 * cfg.receivers))
    return ("--topology", str(topo_path), "--node-name", "pub")


def _wakeup_args(cfg: DemoConfig) -> tuple[str, ...]:
    return () if cfg.cpu_wakeup_us is None else ("--cpu-wakeup-us", str(cfg.cpu_wakeup_us))


def _announce(run: _Run, depth: int, relays: int, groups: int, hosts: int, stream: Any) -> None:
    cfg = run.cfg
    if not cfg.emulate_clocks:
        clocks = "kernel clock on every node"
    else:
        clocks = f"emulated clocks ±{cfg.clock_skew_us:g} µs, ±{cfg.clock_drift_ppm:g} ppm, " + (
            f"corrected by SNTP against {run.ntp_server}" if run.ntp_server else "uncorrected"
        )
    print(
        f"jasper demo ({cfg.control} control path): N={cfg.receivers} endpoints, "
        f"F={cfg.fanout}, H={cfg.hedge}, depth {depth}, {relays} relays in {groups} processes, "
        f"{hosts} receiver processes; rate {cfg.rate:g} msg/s for "
        f"{cfg.duration_s:g} s, hold {cfg.hold_ns / 1000:g} µs, link model "
        f"{'on' if cfg.link_model else 'off'}; {clocks}; output {run.out}",
        file=stream,
    )
    if run.link_model_note:
        print(f"jasper demo: {run.link_model_note}", file=stream)


def _relay_runs(indices: list[int], root: int, per_process: int) -> list[list[int]]:
    """Relay indices in processes: the root alone, the rest in runs of consecutive indices
    (a process's nodes take consecutive ports), at most `per_process` each."""
    runs: list[list[int]] = [[root]]
    for i in sorted(set(indices) - {root}):
        cur = runs[-1]
        if len(runs) > 1 and cur[-1] == i - 1 and len(cur) < per_process:
            cur.append(i)
        else:
            runs.append([i])
    return runs


REALTIME_AT_EXEC_MAX = 24
"""Up to this many daemon processes start in SCHED_FIFO (chrt at exec), like the static
daemons that switch at the top of main(); beyond it they switch once all are up, since
dozens of real-time interpreters importing at once starve one another."""


def _chrt_prefix(cfg: DemoConfig, processes: int) -> list[str]:
    import shutil
    import subprocess

    from overlay.release import LOOP_PRIORITY

    chrt = shutil.which("chrt")
    if not cfg.realtime or chrt is None or processes > REALTIME_AT_EXEC_MAX:
        return []
    prefix = [chrt, "-f", str(LOOP_PRIORITY)]
    ok = subprocess.run([*prefix, "true"], capture_output=True, check=False).returncode == 0
    return prefix if ok else []


def make_loops_realtime(children: list[Child]) -> int:
    """Put each daemon's event loop and helper threads in SCHED_FIFO, as the static-topology
    daemons do themselves once started; controller-mode daemons (overlay/agent.py) do not
    yet. Done after start-up, so dozens of interpreters importing at once do not starve each
    other in one real-time queue. Returns how many were switched (0 without privilege)."""
    from overlay.release import LOOP_PRIORITY

    switched = 0
    for c in children:
        if c.proc is None or c.proc.poll() is not None:
            continue
        # Every thread still in SCHED_OTHER, as if created after the static daemons' own
        # make_realtime (threads inherit it); release threads already sit higher.
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{c.proc.pid}/task")]
        except OSError:
            continue
        ok = False
        for tid in tids:
            try:
                if os.sched_getscheduler(tid) == os.SCHED_OTHER:
                    os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(LOOP_PRIORITY))
                ok = True
            except OSError:
                continue
        switched += ok
    return switched


def _subscribe_all(
    ctl: Any, endpoints: list[tuple[str, int, str | None]], stream: Any, workers: int = 8
) -> list[dict[str, Any]]:
    """One MP per endpoint, each creating itself and subscribing its endpoint over REST
    (as ctl.subscribe_endpoints does), several at once: 1,000 MPs one after the other take
    minutes on a busy 2-core host."""
    from concurrent.futures import ThreadPoolExecutor

    done = 0
    lock = threading.Lock()

    def one(i: int) -> dict[str, Any]:
        nonlocal done
        addr, port, deliver = endpoints[i]
        _, token = ctl.create_mp(f"mp{i}")
        sub: dict[str, Any] = ctl.subscribe(token, 1, addr, port, deliver)
        with lock:
            done += 1
            if done % 50 == 0 or done == len(endpoints):
                stream.write(f"\rsubscribing MPs over REST: {done}/{len(endpoints)}")
                stream.flush()
        return sub

    with ThreadPoolExecutor(max_workers=workers) as pool:
        subs = list(pool.map(one, range(len(endpoints))))
    stream.write("\n")
    return subs


def _start_controlled(run: _Run, plan: Any, stream: Any) -> tuple[str, ...]:
    """The real control path (docs/controller.md): a controller on loopback plans the tree,
    every MP subscribes its endpoint over REST, daemons follow the controller through their
    in-process agents. Returns the publisher's arguments."""
    from controller.loopback import LoopbackController

    cfg, out = run.cfg, run.out
    with contextlib.suppress(FileNotFoundError):
        for suffix in ("", "-wal", "-shm"):
            (out / f"controller.db{suffix}").unlink()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run.ctl = ctl = LoopbackController(
        db_path=out / "controller.db",
        # Pre-registered nodes start heartbeating only once every process is up, which can
        # take a while for 1,000 endpoints on 2 cores; the demo injects no failures.
        heartbeat_timeout_s=600.0,
        log_path=out / "logs" / "controller.log",
        settings_env={
            "JASPER_HOLD_OBJECTIVE_LATE_FRACTION": str(cfg.hold_objective),
            **({"JASPER_LINK_MODEL": json.dumps(dict(cfg.link_model))} if cfg.link_model else {}),
        },
    ).start()
    # The controller shapes an explicit depth for F^D endpoints at once; give it the relays
    # for that shape (or the static plan's, whichever is more).
    n_relays = max(len(plan.relays()), sum(cfg.fanout**i for i in range(plan.depth)))
    per_host = cfg.endpoints_per_receiver
    n_hosts = -(-cfg.receivers // per_host)
    deliver_ports = cfg.receivers if cfg.deliver == "udp" else 0
    base = _port_block(cfg.addr, n_relays + cfg.receivers + deliver_ports)
    rx_base = base + n_relays
    relay_names = [f"relay{i}" for i in range(n_relays)]
    host_names = [f"rx{h}" for h in range(n_hosts)]
    # Register every relay before the stream exists, so its first plan has the full shape
    # (an explicit depth), and every receiver host before the first subscription, so no
    # receiver is rebuilt for endpoints added later.
    for i, name in enumerate(relay_names):
        ctl.call(
            "POST",
            "/v1/nodes",
            json={
                "name": name,
                "role": "relay",
                "data_addr": cfg.addr,
                "port": base + i,
                "capacity": 1,
            },
        )
    ctl.create_stream(
        1,
        "md",
        hedge=cfg.hedge,
        fanout=cfg.fanout,
        depth=plan.depth,
        hold_ns=cfg.hold_ns,
        hold_policy=cfg.hold_policy,
        publisher="pub",
        rate_hint=cfg.rate,
    )
    host_of_port: dict[int, str] = {}
    for h, name in enumerate(host_names):
        k = min(per_host, cfg.receivers - h * per_host)
        port = rx_base + h * per_host
        ctl.call(
            "POST",
            "/v1/nodes",
            json={
                "name": name,
                "role": "receiver",
                "data_addr": cfg.addr,
                "port": port,
                "capacity": k,
            },
        )
        for j in range(k):
            host_of_port[port + j] = name
    sink_base = rx_base + cfg.receivers
    if cfg.deliver == "udp":
        run.sinks = _open_sinks(cfg.addr, sink_base, cfg.receivers)
    t_sub = time.monotonic()
    subs = _subscribe_all(
        ctl,
        [
            (
                cfg.addr,
                rx_base + i,
                f"udp:{cfg.addr}:{sink_base + i}" if cfg.deliver == "udp" else None,
            )
            for i in range(cfg.receivers)
        ],
        stream,
    )
    subscribe_s = time.monotonic() - t_sub
    tree = ctl.tree(1)
    settle = time.monotonic() + 30.0
    while tree.get("pending_epoch") is not None and time.monotonic() < settle:
        time.sleep(0.2)  # a re-plan switches once its nodes applied it, or after a timeout
        tree = ctl.tree(1)
    run.tree = tree
    write_json(out / "topology.json", tree["topology"])
    if cfg.link_model and not tree["topology"].get("link_model"):
        # Hook: the controller is started with JASPER_LINK_MODEL; once its topology
        # documents carry it, the daemons apply it as in the static path.
        run.link_model_note = "link model: off (the controller's plans do not carry one yet)"
    names_by_port = {int(e["port"]): str(e["name"]) for e in tree["endpoints"]}
    run.hosts = {h: [] for h in host_names}
    for port, name in sorted(names_by_port.items()):
        run.hosts[host_of_port[port]].append(name)
    run.subscriptions = {1: [names_by_port[rx_base + i] for i in range(cfg.receivers)]}
    assert len(subs) == cfg.receivers
    used = [relay_names.index(s["node"]) for level in tree["levels"] for s in level]
    root = relay_names.index(tree["levels"][0][0]["node"])
    if len(used) < n_relays:
        print(
            f"jasper demo: the plan uses {len(used)} of {n_relays} registered relays",
            file=stream,
        )
    groups = [[relay_names[i] for i in g] for g in _relay_runs(used, root, cfg.relays_per_process)]
    labels = [f"relay-{g[0]}" for g in groups] + [f"receiver-{h}" for h in host_names]
    run.clocks = node_clocks(cfg, [*labels, "publisher"])
    _announce(run, len(tree["levels"]), len(used), len(groups), n_hosts, stream)
    print(
        f"controller {ctl.url}: {len(subs)} MPs subscribed over REST in {subscribe_s:.1f} s; "
        f"plan epoch {tree['plan_epoch']}, predicted OML {tree['predicted_oml_ns'] / 1000:.0f} µs",
        file=stream,
    )
    common = (
        "--controller", ctl.url, "--data-addr", cfg.addr,
        "--records", str(out), "--status-interval", "1.0",
    )  # fmt: skip
    link = () if cfg.link_model else ("--no-link-model",)
    run.prefix = rt = _chrt_prefix(cfg, len(groups) + n_hosts + 1)
    for g in groups:
        label = f"relay-{g[0]}"
        ready = out / "run" / f"{label}.ready"
        ready.parent.mkdir(parents=True, exist_ok=True)
        argv = rt + jasper_argv(
            "relay", *common, *_node_credential_args(ctl, out, g), "--node-name", ",".join(g),
            "--port", str(base + relay_names.index(g[0])), "--ready-file", str(ready),
            "--fast-path", cfg.fast_path, *link,
            *(("--realtime",) if cfg.realtime else ()), *run.clock_args(label),
        )  # fmt: skip
        run.cluster._spawn(Child(label, "relay", argv, run.cluster.log_dir / f"{label}.log", ready))
    for h, name in enumerate(host_names):
        label = f"receiver-{name}"
        ready = out / "run" / f"{label}.ready"
        argv = rt + jasper_argv(
            "receiver", *common, *_node_credential_args(ctl, out, [name]), "--node-name", name,
            "--port-base", str(rx_base + h * per_host), "--endpoints", str(len(run.hosts[name])),
            "--ready-file", str(ready), "--fast-path", cfg.fast_path, *link,
            "--deliver", "topology" if cfg.deliver == "udp" else "memory",
            "--datapath", cfg.datapath,
            *(() if cfg.realtime else ("--no-realtime",)), *run.clock_args(label),
            *_wakeup_args(cfg),
        )  # fmt: skip
        run.cluster._spawn(
            Child(label, "receiver", argv, run.cluster.log_dir / f"{label}.log", ready)
        )
    # Dozens of interpreters start at once on 2 cores: allow for a slow host.
    startup_timeout_s = max(120.0, 0.5 * cfg.receivers)
    run.cluster.wait_ready(timeout_s=startup_timeout_s)
    ctl.wait_applied({n for g in groups for n in g} | set(host_names), timeout_s=startup_timeout_s)
    return ("--controller", ctl.url, *_node_credential_args(ctl, out, ["pub"]),
            "--data-addr", cfg.addr, "--node-name", "pub", "--stream", "1", *link)  # fmt: skip


def _node_credential_args(ctl: LoopbackController, out: Path, names: list[str]) -> list[str]:
    """A daemon's own join token (admin-issued for its node names) and where it keeps the
    credential it enrols for: every node of the demo enrols as an operator's node would."""
    folder = out / "run" / "credentials"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    label = names[0]
    credential = folder / f"credential-{label}"
    credential.unlink(missing_ok=True)  # an earlier run's, from another controller database
    join = ctl.write_join_token_file(folder / f"join-token-{label}", *names)
    return ["--join-token-file", str(join), "--credential-file", str(credential)]


def _accepted_pairs(out: Path) -> int:
    n = 0
    for p in glob.glob(str(out / "status-receiver-*.json")):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(Path(p).read_text())
            n += sum(int(c.get("accepted", 0)) for c in doc.get("endpoints", {}).values())
    return n


def _drain(out: Path, cfg: DemoConfig, endpoints: int, stream: Any) -> None:
    """Wait until every endpoint has accepted every message sent, or progress stops.

    On a busy host the tree can fall behind the publisher; stopping at a fixed time would cut
    off messages still in flight and count them lost.
    """
    try:
        sent = int(json.loads((out / "status-publisher.json").read_text())["messages"])
    except (OSError, ValueError, KeyError):
        sent = int(cfg.rate * cfg.duration_s)
    expected = sent * endpoints
    if not glob.glob(str(out / "status-receiver-*.json")):
        # Daemons that write no status while running (controller mode today): let the
        # copies in flight arrive, then the stop releases everything held.
        time.sleep(2.0 + cfg.hold_ns / 1e9)
        return
    last, last_change = -1, time.monotonic()
    give_up = time.monotonic() + max(60.0, 3 * cfg.duration_s)
    while time.monotonic() < give_up:
        got = _accepted_pairs(out)
        if got >= expected:
            break
        if got != last:
            last, last_change = got, time.monotonic()
        elif time.monotonic() - last_change > max(10.0, cfg.drain_s):
            # A shared host can stall a process for seconds; only a long silence ends it.
            break
        stream.write(f"\rdraining: {got}/{expected} (message, endpoint) pairs accepted")
        stream.flush()
        time.sleep(0.25)
    if last >= 0:
        stream.write("\n")
    # The last accepted messages are held until their deadline; the stop releases the rest.
    time.sleep(cfg.hold_ns / 1e9 + 0.2)


def _open_sinks(addr: str, base: int, n: int) -> list[Any]:
    """UDP sockets standing in for the MPs' applications (deliver=udp)."""
    import socket

    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Read every 0.2 s by the demo; a full buffer would drop deliveries silently.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setblocking(False)
        s.bind((addr, base + i))
        socks.append(s)
    return socks


def topo_subscriptions(topo: Any) -> dict[int, list[str]]:
    return {topo.stream.id: [e.name for _, e in topo.endpoints()]}


def summarize(
    out: Path,
    subscriptions: Mapping[int, list[str]],
    cfg: DemoConfig,
    *,
    run: _Run | None = None,
) -> dict[str, Any]:
    """Fairness report and counters of a finished run, from the files in `out`."""
    return summarize_with_figures(out, subscriptions, cfg, run=run)[0]


def summarize_with_figures(
    out: Path,
    subscriptions: Mapping[int, list[str]],
    cfg: DemoConfig,
    *,
    run: _Run | None = None,
) -> tuple[dict[str, Any], FairnessFigures]:
    """`summarize` and what the HTML report plots, from the same pass over the records."""
    from jasper.metrics import fairness_analysis
    from jasper.records import empty_sent
    from overlay.recordlog import load_run_releases

    sent_path = out / "sent.npy"
    sent = np.load(sent_path) if sent_path.exists() else empty_sent()
    # One record per (datagram, endpoint): the pair matrices are built from them, once for
    # the headline tau and the ladder.
    releases = load_run_releases(out)
    (report, *rungs), figures = fairness_analysis(
        sent,
        releases,
        subscriptions,
        taus_ns=(cfg.tau_ns, *TAU_LADDER_NS),
        warmup_messages=min(cfg.warmup_messages, max(0, len(sent) - 1)),
    )
    ladder = {
        str(tau): {"p_fair": r.p_fair, "ci": list(r.p_fair_ci), "n": r.messages}
        for tau, r in zip(TAU_LADDER_NS, rungs, strict=True)
    }
    statuses = {}
    for p in sorted(glob.glob(str(out / "status-*.json"))):
        statuses[Path(p).stem.removeprefix("status-")] = json.loads(Path(p).read_text())

    hedge_target = cfg.hedge + 1
    endpoint_counters = {
        name: c
        for s in statuses.values()
        if s.get("kind") == "receiver"
        for name, c in s["endpoints"].items()
    }
    relay_counters = {
        name: c
        for s in statuses.values()
        if s.get("kind") == "relay"
        for name, c in s["nodes"].items()
    }
    parents = [c["distinct_parents"] for c in endpoint_counters.values()]
    missing_endpoints = (
        sorted(set(subscriptions[next(iter(subscriptions))]) - set(endpoint_counters))
        if subscriptions
        else []
    )

    def total(counters: Mapping[str, Mapping[str, Any]], key: str) -> int:
        return int(sum(int(c.get(key, 0)) for c in counters.values()))

    pub = statuses.get("publisher") or statuses.get("publisher-pub") or {}
    processes = {
        name: {
            "cpu_s": round(s["process"]["cpu_s"], 3),
            "peak_rss_mb": round(s["process"]["peak_rss_kb"] / 1024, 1),
        }
        for name, s in statuses.items()
    }
    cpu_total = sum(p["cpu_s"] for p in processes.values())
    counters = {
        "duplicates_dropped_endpoints": total(endpoint_counters, "duplicates"),
        "duplicates_dropped_relays": total(relay_counters, "duplicates"),
        "stale_dropped": total(endpoint_counters, "stale") + total(relay_counters, "stale"),
        "malformed": total(endpoint_counters, "malformed_total")
        + total(relay_counters, "malformed_total"),
        "kernel_drops": total(endpoint_counters, "kernel_drops")
        + total(relay_counters, "kernel_drops"),
        "late_deliveries": total(endpoint_counters, "late"),
        # Loss recovery (docs/recovery.md); the publisher's side is in its status.
        **{key: total(endpoint_counters, key) for key in RECOVERY_COUNTER_NAMES},
        "retransmits_sent": int((pub.get("recovery") or {}).get("retransmits_sent", 0)),
        # NAKs the publisher's kernel dropped (receive buffer full): asked for, never answered.
        "naks_dropped_publisher": int((pub.get("recovery") or {}).get("naks_dropped", 0)),
        "hold_overflow": total(endpoint_counters, "hold_overflow"),
        "relay_copies_sent": total(relay_counters, "sent"),
        "relay_hedge_copies_sent": total(relay_counters, "sent_hedge"),
        "endpoints_reporting": len(endpoint_counters),
        "endpoints_missing": missing_endpoints,
        "endpoints_with_h_plus_1_parents": sum(1 for p in parents if p >= hedge_target),
        "distinct_parents_min": min(parents) if parents else 0,
        "distinct_parents_max": max(parents) if parents else 0,
        "data_paths": data_paths(statuses),
        "receive_lag_mean_us": _lag_mean_us(statuses),
        "receive_lag_max_us": max(
            (s.get("receive_lag", {}).get("max_ns", 0) / 1000 for s in statuses.values()),
            default=0.0,
        ),
        "link_model_lost": sum(
            int(s.get("delay_line", {}).get("lost", 0)) for s in statuses.values()
        ),
    }
    summary: dict[str, Any] = {
        "config": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in vars(cfg).items()},
        "fairness": report.to_dict(),
        "p_fair_by_tau_ns": ladder,
        "offered_rate": pub.get("offered_rate", cfg.rate),
        "achieved_rate": pub.get("achieved_rate", _achieved_rate(sent)),
        "messages_sent": len(sent),
        "counters": counters,
        "cpu_s_total": round(cpu_total, 2),
        "processes": processes,
        "data_path_per_node": data_path_per_node(statuses),
    }
    summary["control"] = cfg.control
    summary["tree"] = _tree_summary(run.tree if run is not None else None)
    hosts = run.hosts if run is not None else {}
    summary["clocks"] = _clock_summary(releases, hosts, cfg, run)
    summary["one_way_delay_us"] = _owd_summary(sent, releases, hosts)
    summary["hold_over_time"] = _hold_summary(sent, run)
    summary["link_steps"] = _step_summary(
        sent, releases, summary["hold_over_time"]["windows"], cfg, run
    )
    summary["text"] = format_summary(summary, report.format_text(), cfg)
    return summary, figures


def _achieved_rate(sent: np.ndarray) -> float | None:
    """Messages per second over the publisher's send stamps (daemons that report no rate)."""
    if len(sent) < 2:
        return None
    span_ns = int(sent["send_time_ns"].max()) - int(sent["send_time_ns"].min())
    return (len(sent) - 1) / (span_ns / 1e9) if span_ns > 0 else None


def _tree_summary(tree: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The controller's plan in a few numbers (None on the static path)."""
    if tree is None:
        return None
    parents = [len(set(e["parents"])) for e in tree.get("endpoints", [])]
    return {
        "plan_epoch": tree.get("plan_epoch"),
        "depth": tree.get("depth"),
        "fanout": tree.get("fanout"),
        "hedge": tree.get("hedge"),
        "relays_per_level": [len(level) for level in tree.get("levels", [])],
        "endpoints": len(parents),
        "planned_parents_min": min(parents) if parents else 0,
        "lemons": list(tree.get("lemons", [])),
        "predicted_oml_us": tree["predicted_oml_ns"] / 1000,
        "predicted_median_us": tree["predicted_median_ns"] / 1000,
    }


def _pcts_us(values: np.ndarray) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
    return {
        "p50": round(float(p50) / 1000, 1),
        "p99": round(float(p99) / 1000, 1),
        "p99.9": round(float(p999) / 1000, 1),
        "max": round(float(values.max()) / 1000, 1),
        "n": len(values),
    }


def _host_index(releases: Releases, hosts: Mapping[str, list[str]]) -> dict[str, np.ndarray]:
    """Release records of each receiver process (by its endpoint names)."""
    if not hosts:
        return {}
    names = np.array(releases.endpoints, dtype=str)
    ep = releases.records["endpoint"]
    return {h: np.isin(ep, np.nonzero(np.isin(names, hs))[0]) for h, hs in hosts.items()}


def _message_positions(
    sent: np.ndarray, releases: Releases
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (message, endpoint) pair the records stand for: its record, and its message's
    position in `sent` sorted by seq (only pairs whose seq was sent), and that sort order."""
    order = np.argsort(sent["seq"], kind="stable")
    seqs = sent["seq"][order]
    src, offset = message_offsets(releases.records["count"])
    seq = releases.records["seq"][src] + offset.astype(np.uint64)
    del offset
    pos = np.clip(np.searchsorted(seqs, seq), 0, len(seqs) - 1)
    match = seqs[pos] == seq
    return src[match], pos[match], order


def _owd_summary(
    sent: np.ndarray, releases: Releases, hosts: Mapping[str, list[str]]
) -> dict[str, Any]:
    """One-way delay from the root's send stamp to the kernel arrival of the kept copy.

    The send stamp is the publisher's (corrected) clock and arrival the kernel clock, so a
    residual publisher clock error shows here as it would at a real endpoint.
    """
    if len(sent) == 0 or len(releases) == 0:
        return {"all": None, "per_receiver": {}}
    src, pos, order = _message_positions(sent, releases)
    owd = releases.records["arrival_ns"][src] - sent["send_time_ns"][order][pos]
    per = {h: _pcts_us(owd[mask[src]]) for h, mask in _host_index(releases, hosts).items()}
    return {"all": _pcts_us(owd), "per_receiver": per}


def _clock_summary(
    releases: Releases, hosts: Mapping[str, list[str]], cfg: DemoConfig, run: _Run | None
) -> dict[str, Any]:
    """Per receiver process: injected skew, the bound its clock reported, and the truth.

    On one host the kernel clock is the truth, so the median (release − deadline) of a
    receiver's on-time releases is its clock's real error at release (plus the release
    path's own error of tens of µs).
    """
    clocks = run.clocks if run is not None else {}
    last = run.samples[-1]["clocks"] if run is not None and run.samples else {}
    per: dict[str, Any] = {}
    for h, mask in _host_index(releases, hosts).items():
        rows = releases.records[mask]
        on_time = rows[rows["arrival_ns"] <= rows["deadline_ns"]]
        # Per message: a record stands for `count` messages released together.
        err = np.repeat(on_time["release_ns"] - on_time["deadline_ns"], on_time["count"])
        n = int(rows["count"].sum())
        injected = clocks.get(f"receiver-{h}")
        reported = last.get(h) or {}
        per[h] = {
            "injected_offset_us": None if injected is None else round(injected[0], 1),
            "injected_drift_ppm": None if injected is None else round(injected[1], 2),
            "reported_status": reported.get("status"),
            "reported_bound_us": None
            if reported.get("bound_ns") is None
            else reported["bound_ns"] / 1000,
            "true_release_error_p50_us": round(float(np.median(err)) / 1000, 1)
            if len(err)
            else None,
            "synced_fraction": round(float(rows["count"][rows["synced"]].sum() / n), 4)
            if n
            else None,
        }
    return {
        "emulated": cfg.emulate_clocks,
        "corrected": bool(run is not None and run.ntp_server),
        "ntp_server": run.ntp_server if run is not None else None,
        "reference_dir": str(run.ref.workdir) if run is not None and run.ref else None,
        "note": run.clock_note if run is not None else "",
        "per_receiver": per,
    }


def _hold_summary(sent: np.ndarray, run: _Run | None) -> dict[str, Any]:
    """The hold in force over time: from the publisher's stamps (deadline − send, per second
    of sending) and, on the controller path, the stream's hold as the controller reported it."""
    per_second: list[dict[str, float]] = []
    if len(sent):
        t = sent["send_time_ns"]
        hold = sent["deadline_ns"] - t
        sec = (t - t.min()) // 1_000_000_000
        for s in np.unique(sec):
            h = hold[sec == s]
            per_second.append(
                {
                    "t_s": int(s),
                    "hold_us_min": float(h.min()) / 1000,
                    "hold_us_max": float(h.max()) / 1000,
                }
            )
    samples = run.samples if run is not None else []
    return {
        "stamped_per_second": per_second,
        "controller": [
            {"t_s": x["t_s"], "hold_ns": x["hold_ns"], "policy": x["hold_policy"]} for x in samples
        ],
        "windows": _hold_windows(run, _time_zero_ns(sent, run)),
    }


def _time_zero_ns(sent: np.ndarray, run: _Run | None) -> int | None:
    """Time zero of the hold and step reports: the first message's send stamp (else the
    publisher's start)."""
    if len(sent):
        return int(sent["send_time_ns"].min())
    return None if run is None else run.t0_wall_ns


def _hold_windows(run: _Run | None, t0: int | None) -> list[dict[str, Any]]:
    """The controller's delay windows (one decision of the deadline policy each), with their
    time in seconds since `t0` (ns, kernel clock)."""
    if run is None or run.hold_doc is None or t0 is None:
        return []
    return [
        {
            "t_s": round((int(w["at_ns"]) - t0) / 1e9, 2),
            "action": w["action"],
            "late_fraction": float(w["late_fraction"]),
            "hold_us": int(w["hold_ns"]) / 1000,
            "delay_estimate_us": int(w["delay_estimate_ns"]) / 1000,
            "extra_hold_us": int(w["extra_hold_ns"]) / 1000,
            "count": int(w["count"]),
        }
        for w in run.hold_doc.get("history", [])
    ]


def windows_to_objective(late: list[float], objective: float) -> int | None:
    """How many windows of a phase it took for lateness to fall back under the objective
    once it had gone over: the 1-based index of that window, 0 when it never went over,
    None when it never came back."""
    over = next((i for i, x in enumerate(late) if x > objective), None)
    if over is None:
        return 0
    return next((j + 1 for j in range(over + 1, len(late)) if late[j] <= objective), None)


def _step_summary(
    sent: np.ndarray,
    releases: Releases,
    windows: list[dict[str, Any]],
    cfg: DemoConfig,
    run: _Run | None,
) -> dict[str, Any] | None:
    """Before and after each link-model step: true lateness, OML and the hold stamped (from
    the records), and the controller's windows with how many it took to meet the objective.

    Times are seconds since the first message was sent. A window is counted in the phase in
    which it closed; the first one after a step still covers some reports from before it.
    """
    t0 = _time_zero_ns(sent, run)
    if not cfg.link_steps or run is None or t0 is None:
        return None
    applied = [x for x in run.steps_applied if "applied_wall_ns" in x]
    starts = [0.0] + [(int(x["applied_wall_ns"]) - t0) / 1e9 for x in applied]
    scales = [1.0] + [float(x["scale"]) for x in applied]
    ends = [*starts[1:], float("inf")]
    send_s = (sent["send_time_ns"] - t0) / 1e9 if len(sent) else np.zeros(0)
    # Per message: pairs delivered, pairs late (first copy after the deadline, kernel clock
    # = true time on one host) and the slowest endpoint's arrival.
    order = np.argsort(sent["seq"], kind="stable")
    seqs = sent["seq"][order]
    n_late = np.zeros(len(seqs), dtype=np.int64)
    n_got = np.zeros(len(seqs), dtype=np.int64)
    slowest = np.full(len(seqs), np.iinfo(np.int64).min, dtype=np.int64)
    if len(seqs) and len(releases):
        src, pos, _ = _message_positions(sent, releases)
        d = releases.records
        n_got += np.bincount(pos, minlength=len(seqs))
        n_late += np.bincount(pos[(d["arrival_ns"] > d["deadline_ns"])[src]], minlength=len(seqs))
        np.maximum.at(slowest, pos, d["arrival_ns"][src])
    msg_s = send_s[order]
    oml = (slowest - sent["send_time_ns"][order]).astype(np.float64)
    hold = (sent["deadline_ns"][order] - sent["send_time_ns"][order]).astype(np.float64)
    phases = []
    for start, end, scale in zip(starts, ends, scales, strict=True):
        m = (msg_s >= start) & (msg_s < end)
        got = m & (n_got > 0)
        in_phase = [w for w in windows if start <= w["t_s"] < end and w["count"] > 0]
        to_objective = windows_to_objective(
            [w["late_fraction"] for w in in_phase], cfg.hold_objective
        )
        h = hold[m]
        phases.append(
            {
                "start_s": round(start, 2),
                "end_s": None if end == float("inf") else round(end, 2),
                "scale": scale,
                "messages": int(m.sum()),
                "late_fraction": float(n_late[m].sum() / n_got[m].sum())
                if n_got[m].sum()
                else None,
                "oml_us": _pcts_us(oml[got]),
                "hold_stamped_us": None
                if not len(h)
                else {
                    "first": float(h[0]) / 1000,
                    "max": float(h.max()) / 1000,
                    "last": float(h[-1]) / 1000,
                    "median": float(np.median(h)) / 1000,
                },
                "windows": len(in_phase),
                "window_late_fractions": [round(w["late_fraction"], 4) for w in in_phase],
                "window_hold_us": [w["hold_us"] for w in in_phase],
                "windows_to_objective": to_objective,
                "seconds_to_objective": None
                if not to_objective
                else round(in_phase[to_objective - 1]["t_s"] - start, 2),
                "windows_meeting_objective": sum(
                    w["late_fraction"] <= cfg.hold_objective for w in in_phase
                ),
            }
        )
    per_second = []
    sec = np.floor(msg_s).astype(np.int64)
    for x in np.unique(sec):
        m = sec == x
        pairs = int(n_got[m].sum())
        per_second.append(
            {
                "t_s": int(x),
                "messages": int(m.sum()),
                "late_fraction": round(float(n_late[m].sum()) / pairs, 4) if pairs else None,
                "hold_us_median": float(np.median(hold[m])) / 1000,
                "oml_us_p50": round(float(np.median(oml[m & (n_got > 0)])) / 1000, 1)
                if (m & (n_got > 0)).any()
                else None,
            }
        )
    base = dict(cfg.link_model or {})
    return {
        "policy": cfg.hold_policy,
        "objective_late_fraction": cfg.hold_objective,
        "base_median_us": base.get("median_ns", 0) / 1000,
        "base_p99_us": base.get("p99_ns", 0) / 1000,
        "t0_wall_ns": t0,
        "steps": run.steps_applied,
        "phases": phases,
        "per_second": per_second,
    }


def _lag_mean_us(statuses: Mapping[str, Mapping[str, Any]]) -> float:
    lags = [s["receive_lag"] for s in statuses.values() if "receive_lag" in s]
    count = sum(int(x["count"]) for x in lags)
    return sum(float(x["mean_ns"]) * int(x["count"]) for x in lags) / count / 1000 if count else 0.0


def format_summary(summary: Mapping[str, Any], fairness_text: str, cfg: DemoConfig) -> str:
    c = summary["counters"]
    procs: Mapping[str, Mapping[str, float]] = summary["processes"]
    achieved = summary["achieved_rate"]
    lines = [
        "== Jasper demo: fairness report" + _hedging_warning(summary, cfg),
        _control_line(summary),
        fairness_text,
        "P(F) at other tau: "
        + ", ".join(
            f"{int(t) / 1000:g} µs {100 * v['p_fair']:.1f}%"
            if v["p_fair"] is not None
            else f"{int(t) / 1000:g} µs -"
            for t, v in summary["p_fair_by_tau_ns"].items()
        ),
        f"offered {summary['offered_rate']:g} msg/s, achieved "
        + ("-" if achieved is None else f"{achieved:.1f}")
        + f" msg/s ({summary['messages_sent']} messages)",
        f"duplicates dropped: {c['duplicates_dropped_endpoints']} at endpoints, "
        f"{c['duplicates_dropped_relays']} at relays; malformed {c['malformed']}; "
        f"kernel drops {c['kernel_drops']}; link-model losses {c['link_model_lost']}",
        f"released at once, past their deadline when processed: {c['late_deliveries']} pairs "
        "(late arrivals plus receive-path backlog)",
        f"data paths: {c.get('data_paths') or '-'}",
        *(
            [
                f"receive-path lag (processing − kernel arrival) mean "
                f"{c['receive_lag_mean_us']:.0f} µs, max {c['receive_lag_max_us']:.0f} µs"
            ]
            if "python" in str(c.get("data_paths", "python"))
            else []
        ),
        f"endpoints with H+1={cfg.hedge + 1} distinct parents: "
        f"{c['endpoints_with_h_plus_1_parents']}/{c['endpoints_reporting']} "
        f"(min {c['distinct_parents_min']}, max {c['distinct_parents_max']})",
        f"CPU used: {summary['cpu_s_total']:.2f} s over {len(procs)} processes",
    ]
    by_kind: dict[str, list[tuple[str, Mapping[str, float]]]] = {}
    for name, p in procs.items():
        by_kind.setdefault(name.split("-")[0], []).append((name, p))
    if len(procs) <= 16:
        lines.append("per process: name  cpu_s  peak_rss_MB")
        for name, p in procs.items():
            lines.append(f"  {name:<18} {p['cpu_s']:7.2f} {p['peak_rss_mb']:7.1f}")
    else:
        lines.append("per process kind: count  cpu_s min/median/max  peak_rss_MB min/median/max")
        for kind, items in by_kind.items():
            cpu = np.array([p["cpu_s"] for _, p in items])
            rss = np.array([p["peak_rss_mb"] for _, p in items])
            lines.append(
                f"  {kind:<10} {len(items):4d}  {cpu.min():.2f}/{np.median(cpu):.2f}/"
                f"{cpu.max():.2f}  {rss.min():.1f}/{np.median(rss):.1f}/{rss.max():.1f}"
            )
    if c["endpoints_missing"]:
        lines.append(f"endpoints with no status (process died?): {c['endpoints_missing'][:10]}")
    lines += _clock_lines(summary)
    lines += _step_lines(summary)
    return "\n".join(lines)


def _hedging_warning(summary: Mapping[str, Any], cfg: DemoConfig) -> str:
    """Empty when every endpoint got copies from H+1 distinct parents (or H=0 was asked);
    else why not, for the report's first line: a reader must not take H for granted."""
    c = summary["counters"]
    full, reporting = c["endpoints_with_h_plus_1_parents"], c["endpoints_reporting"]
    if cfg.hedge == 0 or (reporting and full == reporting):
        return ""
    tree = summary.get("tree")
    if tree is not None:
        planned = int(tree["planned_parents_min"])
    else:
        from jasper.tree import hedged_shape, tree_shape

        fanout, depth = hedged_shape(cfg.receivers, fanout=cfg.fanout, hedge=cfg.hedge)
        plan = tree_shape(cfg.receivers, fanout=fanout, hedge=cfg.hedge, depth=depth)
        planned = min(len(set(plan.parents[leaf])) for leaf in plan.leaf_names())
    if planned <= 1:
        why = f"hedging OFF: with N={cfg.receivers} the tree has one relay above the endpoints"
    elif planned < cfg.hedge + 1:
        why = (
            f"hedging reduced: with N={cfg.receivers} an endpoint has at most {planned} "
            f"distinct parents, not H+1={cfg.hedge + 1}"
        )
    elif not c["distinct_parents_max"]:
        why = "no endpoint received a copy, so hedging is unchecked"
    else:
        why = (
            f"hedging short: {full}/{reporting} endpoints saw copies from H+1={cfg.hedge + 1} "
            f"distinct parents although {planned} were planned (min seen "
            f"{c['distinct_parents_min']})"
        )
    return f" (WARNING {why})"


def _control_line(summary: Mapping[str, Any]) -> str:
    tree = summary.get("tree")
    if summary.get("control") != "controller" or tree is None:
        return "control path: static topology file (no controller)"
    lemons = ", ".join(tree["lemons"]) or "none"
    return (
        f"control path: controller on loopback, {tree['endpoints']} MPs subscribed over REST; "
        f"plan epoch {tree['plan_epoch']}, depth {tree['depth']}, relays per level "
        f"{tree['relays_per_level']}, planned parents per endpoint >= "
        f"{tree['planned_parents_min']}, predicted OML {tree['predicted_oml_us']:.0f} µs "
        f"(median endpoint {tree['predicted_median_us']:.0f} µs), lemons {lemons}"
    )


def _clock_lines(summary: Mapping[str, Any]) -> list[str]:
    clocks = summary["clocks"]
    owd = summary["one_way_delay_us"]
    late = summary["fairness"].get("late_fraction")
    if not clocks["emulated"]:
        head = "clocks: kernel clock on every node (no emulated skew)"
    elif clocks["corrected"]:
        head = f"clocks: emulated skew, corrected by SNTP against {clocks['ntp_server']}"
    else:
        head = "clocks: emulated skew, NOT corrected (negative control)"
    if clocks["note"]:
        head += f" [{clocks['note']}]"
    lines = [
        "== Clocks, one-way delay, hold",
        head,
        "late fraction: " + ("-" if late is None else f"{100 * late:.3f}%"),
    ]
    if owd["all"]:
        a = owd["all"]
        lines.append(
            f"one-way delay (kernel arrival − root send stamp) µs: p50 {a['p50']}  "
            f"p99 {a['p99']}  p99.9 {a['p99.9']}  max {a['max']}"
        )
    per = clocks["per_receiver"]
    if per:
        lines.append(
            "receiver   injected µs/ppm   reported bound µs   true err p50 µs  synced   "
            "OWD µs p50/p99/p99.9"
        )
        for i, (h, c) in enumerate(per.items()):
            if i >= 12:
                lines.append(f"  ... {len(per) - 12} more receivers in summary.json")
                break
            inj = (
                "-"
                if c["injected_offset_us"] is None
                else f"{c['injected_offset_us']:+.0f}/{c['injected_drift_ppm']:+.1f}"
            )
            bound = (
                "-"
                if c["reported_bound_us"] is None
                else f"{c['reported_bound_us']:.1f} ({c['reported_status']})"
            )
            if c["reported_bound_us"] is None and c["reported_status"]:
                bound = f"- ({c['reported_status']})"
            o = owd["per_receiver"].get(h)
            o_txt = "-" if not o else f"{o['p50']}/{o['p99']}/{o['p99.9']}"
            err = "-" if c["true_release_error_p50_us"] is None else c["true_release_error_p50_us"]
            synced = "-" if c["synced_fraction"] is None else f"{100 * c['synced_fraction']:.0f}%"
            lines.append(f"  {h:<10} {inj:>14}   {bound:>17}   {err!s:>14}  {synced:>6}   {o_txt}")
    hold = summary["hold_over_time"]
    if summary.get("link_steps"):
        # The step section prints the hold per second and per controller window.
        return lines
    stamped = hold["stamped_per_second"]
    if stamped:
        lo = min(x["hold_us_min"] for x in stamped)
        hi = max(x["hold_us_max"] for x in stamped)
        if hi - lo < 1:
            lines.append(f"hold (deadline − send stamp): {lo:g} µs throughout {len(stamped)} s")
        else:
            lines.append(
                "hold per second (deadline − send stamp, µs): "
                + ", ".join(f"{x['t_s']}s {x['hold_us_min']:.0f}" for x in stamped)
            )
    ctl = [x for x in hold["controller"] if x["hold_ns"] is not None]
    if ctl:
        values = sorted({int(x["hold_ns"]) for x in ctl})
        lines.append(
            f"controller's stream hold ({ctl[-1]['policy']}): "
            + (
                f"{values[0] / 1000:g} µs at all {len(ctl)} readings"
                if len(values) == 1
                else ", ".join(f"{x['t_s']:g}s {int(x['hold_ns']) / 1000:g}" for x in ctl)
            )
        )
    return lines


def _step_lines(summary: Mapping[str, Any]) -> list[str]:
    steps = summary.get("link_steps")
    if not steps:
        return []
    objective = steps["objective_late_fraction"]
    lines = [
        f"== Link-model steps (hold {steps['policy']}, objective <= {100 * objective:g}% of "
        "one endpoint's messages late per window)",
        f"starting link model: median {steps['base_median_us']:g} µs, p99 "
        f"{steps['base_p99_us']:g} µs per link",
    ]
    for x in steps["steps"]:
        if "error" in x:
            lines.append(f"step at {x['at_s']:g} s x{x['scale']:g}: FAILED ({x['error']})")
        else:
            lines.append(
                f"step at {x['at_s']:g} s (applied {x['applied_s']:.2f} s): delays "
                f"x{x['scale']:g} of the start, median "
                f"{x['model']['median_ns'] / 1000:g} µs per link"
            )
    lines.append(
        "phase (s)     scale  messages  late (true)  OML p50/p99 µs  "
        "hold stamped µs first/median/max/last  windows: back under objective, all under"
    )
    for ph in steps["phases"]:
        span = f"{ph['start_s']:.1f}-" + ("end" if ph["end_s"] is None else f"{ph['end_s']:.1f}")
        late = "-" if ph["late_fraction"] is None else f"{100 * ph['late_fraction']:.2f}%"
        oml = "-" if not ph["oml_us"] else f"{ph['oml_us']['p50']:.0f}/{ph['oml_us']['p99']:.0f}"
        h = ph["hold_stamped_us"]
        hold = (
            "-"
            if h is None
            else f"{h['first']:.0f}/{h['median']:.0f}/{h['max']:.0f}/{h['last']:.0f}"
        )
        reach = (
            "never"
            if ph["windows_to_objective"] is None
            else "never over"
            if ph["windows_to_objective"] == 0
            else f"#{ph['windows_to_objective']} ({ph['seconds_to_objective']:.1f} s)"
        )
        lines.append(
            f"  {span:<12} x{ph['scale']:<5g} {ph['messages']:8d}  {late:>11}  {oml:>14}  "
            f"{hold:>37}  {reach:>14} {ph['windows_meeting_objective']:>3}/{ph['windows']}"
        )
    lines.append(
        "per second since the first message: true late % / hold stamped µs: "
        + ", ".join(
            f"{x['t_s']}s "
            + ("-" if x["late_fraction"] is None else f"{100 * x['late_fraction']:.1f}")
            + f"/{x['hold_us_median']:.0f}"
            for x in steps["per_second"]
        )
    )
    windows = summary["hold_over_time"]["windows"]
    if windows:
        lines.append("controller windows: t s, worst endpoint late %, hold µs (action)")
        lines.append(
            "  "
            + "; ".join(
                f"{w['t_s']:.1f} {100 * w['late_fraction']:.1f}% {w['hold_us']:.0f} ({w['action']})"
                for w in windows
                if w["count"] > 0
            )
        )
    return lines
