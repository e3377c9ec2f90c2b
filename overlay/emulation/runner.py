"""The emulation orchestrator: namespaces, daemons, interleaved configuration blocks, faults,
records, and the table.

One run builds one emulated region (a namespace per relay VM, per receiver host, for the
publisher and for the controller), then measures the configurations in interleaved blocks on
the same endpoints: direct unicast from the publisher, tree H=0, tree without hold, Jasper.
Each block starts its daemons (forked from a preloaded spawner into their namespaces), lets the
publisher send a fixed number of messages at a fixed rate, stops the daemons so they write
their ground-truth records, and keeps those records. Fault blocks run Jasper with one fault
each. Everything is torn down in `close()`, which the CLI calls from `finally` and from its
signal handlers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jasper.layout import Layout as PlanLayout
from jasper.layout import Spot, topology_of
from jasper.records import (
    SENT_DTYPE,
    Releases,
    concat_releases,
    empty_releases,
    message_offsets,
    releases_within,
)
from jasper.topology import (
    MAX_HOLD_NS,
    StreamAuth,
    StreamConfig,
    Topology,
    parse_topology,
)
from jasper.tree import PlanTables
from overlay.emulation.faults import (
    Fault,
    FaultEvent,
    FaultInjector,
    NodeGate,
    attach_linkloss,
)
from overlay.emulation.netns import (
    EMULATION_BACKLOG,
    EmulatedNetwork,
    backlog_drops,
    raise_backlog,
    restore_backlog,
    write_manifest,
)
from overlay.emulation.spawner import Spawner
from overlay.emulation.timeref import TimeReference
from overlay.recordlog import load_releases, load_run_releases, save_releases
from overlay.report_page import data_paths

log = logging.getLogger(__name__)

STREAM_ID = 1
RELAY_PORT = 7000
ENDPOINT_PORT_BASE = 20000
AGENT_HEARTBEAT_S = 5.0
"""Seconds between the emulated agents' heartbeats (the daemons' --heartbeat-s)."""

CONFIG_NAMES = ("unicast", "tree-h0", "tree-nohold", "jasper")
"""The default configurations. "jasper" and "tree-nohold" run under the controller (agents in
the daemons); "unicast" (no tree: the controller plans none) and "tree-h0" (its own stream,
which agents cannot pick while Jasper's stream names the same nodes) run from files.
"jasper-file" (Jasper's tree and hold from a static file) can be added to compare."""

DEFAULT_LINK_MODEL: dict[str, Any] = {
    "seed": 7,
    "median_ns": 40_000,
    "p99_ns": 120_000,
    "spike_prob": 0.001,
    "spike_min_ns": 300_000,
    "spike_max_ns": 1_000_000,
    "loss": 0.0,
    "lemon_fraction": 0.02,
    "lemon_factor": 2.5,
    "emulated_at": "receivers",
}
"""Cloud-like links (intra-region one-way delays of tens of µs, rare stalls, 2% lemon VMs),
emulated over the whole path at the (native) receivers so relays forward at once, in the kernel
where eBPF loads (docs/link-model.md); `jasper emulate` switches to "hops" for Python receivers."""


@dataclass(frozen=True, kw_only=True)
class ConfigSpec:
    """One configuration measured in the run."""

    name: str
    """unicast, tree-h0, tree-nohold or jasper (the simulator's names)."""
    description: str
    hedge: int | None
    """Sibling hedging of the tree; None = no tree (the publisher sends to every endpoint)."""
    hold: bool
    """True when the root stamps a release deadline; otherwise endpoints deliver at arrival."""
    agents: bool = False
    """Daemons run with --controller URL: their in-process agents register, heartbeat and take
    the plan, the hold and the link model from the controller."""


CALIBRATION = "calibration"
"""The block that measures this machine's release floor (not a configuration of the table)."""


def config_specs(hedge: int) -> dict[str, ConfigSpec]:
    return {
        CALIBRATION: ConfigSpec(
            name=CALIBRATION,
            description=f"tree H={hedge} from a file, hold 3x the delays: the release floor",
            hedge=hedge,
            hold=True,
        ),
        "unicast": ConfigSpec(
            name="unicast",
            description="publisher sends one copy to every endpoint, deliver at arrival",
            hedge=None,
            hold=False,
        ),
        "tree-h0": ConfigSpec(
            name="tree-h0", description="tree H=0, deliver at first arrival", hedge=0, hold=False
        ),
        "tree-nohold": ConfigSpec(
            name="tree-nohold",
            description=f"tree H={hedge}, deliver at first arrival; daemons under the controller "
            "(hold 0)",
            hedge=hedge,
            hold=False,
            agents=True,
        ),
        "jasper": ConfigSpec(
            name="jasper",
            description=f"tree H={hedge}, hold to the root's deadline; daemons under the "
            "controller (in-process agents)",
            hedge=hedge,
            hold=True,
            agents=True,
        ),
        "jasper-file": ConfigSpec(
            name="jasper-file",
            description=f"tree H={hedge}, hold; the controller's plan as a static file",
            hedge=hedge,
            hold=True,
        ),
        # Runs made before "jasper" itself ran under agents named that configuration so.
        "jasper-agents": ConfigSpec(
            name="jasper-agents",
            description=f"tree H={hedge}, hold; daemons under the controller (in-process agents)",
            hedge=hedge,
            hold=True,
            agents=True,
        ),
    }


@dataclass(frozen=True, kw_only=True)
class EmulationSettings:
    """Everything one run is parameterized by."""

    receivers: int = 1000
    """MP endpoints (leaves of the tree)."""
    endpoints_per_host: int = 15
    """Endpoints hosted by one receiver process / namespace (the paper: 10–20 per VM)."""
    fanout: int = 10
    hedge: int = 2
    depth: int | None = None
    rate: float = 10.0
    """Messages per second the publisher is asked to send."""
    messages: int = 3000
    """Scored messages per configuration (blocks x (block_messages − warmup))."""
    block_messages: int = 500
    """Messages per block, warm-up included."""
    warmup_messages: int = 10
    """Messages at the start of every block that are not scored."""
    tau_ns: int = 0
    """DWS threshold of P(F) of the headline; 0: from the run's calibration block (the DWS
    this machine reaches, p90, when every copy arrives long before the deadline)."""
    calibration_messages: int = 60
    """Messages of the calibration block (tau_ns = 0 only)."""
    hold_percentile: float = 99.9
    """Jasper's hold: max over endpoints of this OWD percentile (from the previous tree block)."""
    extra_hold_ns: int = 100_000
    """Added on top of the measured percentile (covers release jitter and clock bounds)."""
    min_hold_ns: int = 300_000
    configs: tuple[str, ...] = CONFIG_NAMES
    faults: bool = True
    fault_block_messages: int = 150
    clock_step_ns: int = -10_000_000
    """clock-step fault: how far one receiver host's emulated clock jumps (negative: behind,
    so it releases late until its next SNTP burst against the reference measures the jump)."""
    link_model: Mapping[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_LINK_MODEL))
    controller: bool = True
    """Start the controller and subscribe MPs through its REST API when it is available."""
    batch_us: float = 0.0
    """The publisher's --batch-us: messages due within this window share a datagram (0: one
    message per datagram). Copies, not messages, are what the machine pays for."""
    fast_path: str = "auto"
    """Relays' and receivers' --fast-path: eBPF where it loads (auto), required, or user."""
    receiver_args: tuple[str, ...] = ()
    """Extra arguments for every `jasper receiver` (e.g. --spin-us 20)."""
    seed: int = 1
    cpu_limit: float = 0.60
    """A run whose machine CPU stayed above this during scored blocks is not valid for timing."""
    tag: str = ""
    out_dir: str = "emulation-out"
    settle_s: float = 1.0
    """Pause after starting a block's daemons before the publisher starts."""

    def blocks_per_config(self) -> int:
        per_block = self.block_messages - self.warmup_messages
        return max(1, -(-self.messages // per_block))


# --- topology --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where every node lives in the emulated region."""

    publisher: str
    """Publisher host address."""
    relays: Mapping[str, str]
    """Relay name -> host address."""
    hosts: Mapping[str, tuple[str, tuple[str, ...]]]
    """Receiver host name -> (address, endpoint names)."""

    def host_of(self) -> dict[str, str]:
        return {e: h for h, (_, eps) in self.hosts.items() for e in eps}


def endpoint_hosts(receivers: int, per_host: int) -> dict[str, tuple[str, ...]]:
    """Receiver host "h<k>" -> endpoints, consecutive leaves together (siblings of one relay)."""
    hosts: dict[str, tuple[str, ...]] = {}
    for k, start in enumerate(range(0, receivers, per_host)):
        hosts[f"h{k}"] = tuple(f"e{i}" for i in range(start, min(receivers, start + per_host)))
    return hosts


def build_topology(
    layout: Layout,
    *,
    plan: Any | None,
    hold_ns: int,
    hedge: int,
    link_model: Mapping[str, Any] | None,
    plan_epoch: int = 1,
    auth: StreamAuth | None = None,
) -> Topology:
    """The static topology of one configuration. `plan` is a TreePlan, or None for direct
    unicast (the publisher's targets are then every endpoint). `auth`: the stream's keys (the
    emulation makes one per run, as the controller would)."""
    endpoints = {
        e: Spot(host=h, port=ENDPOINT_PORT_BASE + j, mp=f"mp-{e}")
        for h, (_, eps) in layout.hosts.items()
        for j, e in enumerate(eps)
    }
    tables = plan.tables() if plan is not None else PlanTables.direct("pub", endpoints)
    where = PlanLayout(
        publisher="pub",
        publisher_addr=layout.publisher,
        relays={r: (a, RELAY_PORT) for r, a in layout.relays.items()},
        hosts={h: a for h, (a, _) in layout.hosts.items()},
        endpoints=endpoints,
    )
    stream = StreamConfig(id=STREAM_ID, name="md", hedge=hedge, hold_ns=hold_ns, auth=auth)
    topo = topology_of(
        tables, where, stream=stream, plan_epoch=plan_epoch, link_model=link_model or None
    )
    # Through the parser, as a file-started daemon reads it (validation included).
    return parse_topology(topo.to_dict())


# --- machine figures -------------------------------------------------------------------------


def cpu_sample() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat (softirq counts as busy)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


def process_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) used so far by the live processes among `pids`."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / tick


def cpu_fraction(a: tuple[int, int], b: tuple[int, int]) -> float:
    busy, total = b[0] - a[0], b[1] - a[1]
    return busy / total if total > 0 else 0.0


# --- results ---------------------------------------------------------------------------------


@dataclass
class BlockResult:
    """One block: which configuration, its records, and what the machine did."""

    index: int
    config: str
    fault: Fault | None
    sent: np.ndarray
    releases: Releases
    """The receivers' records: one per (datagram, endpoint) released."""
    hold_ns: int
    offered_rate: float
    achieved_rate: float
    cpu_fraction: float
    """Whole machine busy fraction while the publisher sent (other users' load included)."""
    own_cpu_fraction: float
    """The emulation's daemons' CPU while the publisher sent, as a fraction of all cores."""
    startup_s: float
    """Time from the first daemon's fork to the last one's ready file."""
    wall_s: float
    controller_cpu_s: float = 0.0
    """The controller's CPU while the publisher sent (heartbeats, config polls, hold)."""
    events: list[FaultEvent] = field(default_factory=list)
    daemon_errors: list[str] = field(default_factory=list)
    backlog_drops: int = 0
    """Packets the kernel dropped at a full per-CPU backlog during the block (whole machine)."""
    data_paths: str = ""
    """Which data path the block's nodes ran, e.g. "receivers native x3; relays ebpf x5; link
    model emulated at receivers" (from their status files; overlay.report_page.data_paths)."""

    def scored(self, warmup: int) -> tuple[np.ndarray, Releases]:
        """Records without the block's warm-up messages (a datagram that straddles the end of
        the warm-up keeps its later messages)."""
        sent = self.sent[np.argsort(self.sent["send_time_ns"], kind="stable")]
        keep = sent[warmup:]
        if len(self.releases) == 0 or len(keep) == 0:
            return keep, self.releases.select(np.zeros(0, dtype=np.intp))
        return keep, releases_within(self.releases, keep)


@dataclass
class ProcessStat:
    role: str
    node: str
    block: int
    status: int
    cpu_s: float
    maxrss_kb: int


class Emulation:
    """One run. Use as a context manager, or call close() yourself (idempotent)."""

    def __init__(
        self,
        settings: EmulationSettings,
        *,
        progress: Callable[[str, float], None] | None = None,
    ) -> None:
        from jasper.tree import tree_shape

        self.s = settings
        self.tag = settings.tag or f"{os.getpid() % 100000:05d}"
        self.out = Path(settings.out_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress or (lambda text, frac: None)
        self.net = EmulatedNetwork(tag=self.tag)
        self.plans = {
            h: tree_shape(settings.receivers, fanout=settings.fanout, hedge=h, depth=settings.depth)
            for h in sorted({settings.hedge, 0})
        }
        self.plan = self.plans[settings.hedge]
        self.specs = config_specs(settings.hedge)
        for name in settings.configs:
            if name not in self.specs:
                raise ValueError(f"unknown configuration {name!r}; choose from {list(self.specs)}")
            if self.specs[name].agents and not settings.controller:
                raise ValueError(f"{name} needs the controller")
        host_eps = endpoint_hosts(settings.receivers, settings.endpoints_per_host)
        pub = self.net.add_host("pub")
        ctl = self.net.add_host("ctl")
        relays = {r: self.net.add_host(r).addr for r in self.plan.relays()}
        hosts = {h: (self.net.add_host(h).addr, eps) for h, eps in host_eps.items()}
        self.ctl_addr = ctl.addr
        self.layout = Layout(publisher=pub.addr, relays=relays, hosts=hosts)
        self.spawner: Spawner | None = None
        self.live: dict[str, int] = {}
        self.blocks: list[BlockResult] = []
        self.processes: list[ProcessStat] = []
        self.notes: list[str] = []
        self.closed = False
        self._backlog_restore: int | None = None
        self.ctl_pid = 0
        self.timeref: TimeReference | None = None
        """The region's reference chronyd (for the clock-step fault's SNTP-corrected clock)."""
        self.clock_step_ok = True
        """False once the reference could not start: the clock-step block is left out."""
        self.control: Any = None
        self.control_summary: dict[str, Any] = {}
        self.ctl_streams: dict[int, int] = {}
        """Hedge -> the controller's stream id for it."""
        self.ctl_endpoint_names: dict[str, str] = {}
        """The controller's endpoint keys -> the emulation's leaf names."""
        self.tree_topos: dict[int, Topology] = {}
        """Hedge -> the controller's plan (as a topology), when the control plane is on."""
        self.auth = StreamAuth.fresh()
        """The stream key of the static plans (the controller issues its own)."""
        from overlay.emulation.control import TreeView

        self.static_view = TreeView.of(
            build_topology(
                self.layout, plan=self.plan, hold_ns=0, hedge=settings.hedge, link_model=None
            )
        )
        self.view = self.static_view
        self._progress_state: tuple[str, int, int, int] = ("", 0, 1, 1)
        self.tau_ns: int | None = settings.tau_ns or None
        """The headline tau: the settings', else the calibration's once it ran."""
        self.calibration: dict[str, Any] = {}
        self._detach: list[Callable[[], None]] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Emulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _manifest(self) -> None:
        write_manifest(
            self.tag,
            {
                "tag": self.tag,
                "pid": os.getpid(),
                "pids": sorted(self.live.values())
                + ([self.spawner.proc.pid] if self.spawner else [])
                + ([self.ctl_pid] if getattr(self, "ctl_pid", 0) else [])
                + ([self.timeref.proc.pid] if self.timeref and self.timeref.proc else []),
                "bpf_nodes": sorted(self.layout.relays) + sorted(self.layout.hosts),
                "out": str(self.out),
            },
        )

    def setup(self) -> None:
        """Build the namespaces and start the spawner."""
        self._manifest()
        (self.out / "run.json").write_text(
            json.dumps({"settings": settings_dict(self.s), "tag": self.tag}, indent=1)
        )
        self.progress(f"building {len(self.net.hosts)} namespaces", 0.0)
        self._backlog_restore = raise_backlog()
        if self._backlog_restore is not None:
            self.notes.append(
                f"net.core.netdev_max_backlog raised from {self._backlog_restore} to "
                f"{EMULATION_BACKLOG} for the run (restored at the end)"
            )
        self.net.build()
        self.spawner = Spawner(
            [
                "numpy",
                "jasper_cli.main",
                "jasper_cli.relay",
                "jasper_cli.receiver",
                "jasper_cli.publisher",
                "overlay.relay",
                "overlay.receiver",
                "overlay.publisher",
                "overlay.daemon",
                "overlay.agent",
                "overlay.release",
                "overlay.common",
                "overlay.delayline",
                "overlay.kernel",
                "overlay.recordlog",
                "jasper.topology",
                "jasper.linkmodel",
                "jasper.wire",
                "jasper.dedup",
                "jasper.schedule",
            ]
        )
        self._manifest()
        if self.s.controller:
            try:
                self._control_plane()
            except Exception as exc:
                log.exception("control plane")
                self.notes.append(
                    f"control plane failed ({type(exc).__name__}: {exc}); "
                    "trees from jasper.tree.tree_shape instead"
                )
                self.tree_topos.clear()
                self.view = self.static_view
        if self.s.faults and any(f.kind == "clock-step" for f in self.default_faults()):
            self.progress("starting the reference chronyd", 0.0)
            ref_host = self.net.hosts["ctl"]
            self.timeref = TimeReference(
                netns=ref_host.netns,
                addr=ref_host.addr,
                subnet=self.net.subnet,
                workdir=self.out / "timeref",
            )
            try:
                self.timeref.start()
            except (OSError, RuntimeError) as exc:
                self.notes.append(f"no reference chronyd ({exc}); clock-step fault skipped")
                self.timeref = None
                self.clock_step_ok = False
            self._manifest()

    def _control_plane(self) -> None:
        """Controller in its namespace; nodes registered; one MP per endpoint subscribed over
        REST to the Jasper stream (H) and, for the tree-H=0 baseline, to a second stream
        (H=0); the controller's plans become the trees of every tree configuration."""
        from overlay.emulation.control import (
            ControlPlane,
            SubscriptionStats,
            TreeView,
            topology_from_tree,
        )

        assert self.spawner is not None
        ctl_host = self.net.hosts["ctl"]
        self.control = ControlPlane(netns=ctl_host.netns, addr=ctl_host.addr)
        ctl_dir = self.out / "controller"
        ctl_dir.mkdir(parents=True, exist_ok=True)
        db = ctl_dir / "controller.db"
        for old in ctl_dir.glob("controller.db*"):
            old.unlink()
        self.progress("starting the controller", 0.0)
        env = self.control.env()
        if self.s.link_model:
            # Every plan the controller sends carries the run's link model, so agent-run
            # daemons emulate the same links as the ones started from a file.
            env["JASPER_LINK_MODEL"] = json.dumps(dict(self.s.link_model))
        self.ctl_pid = self.spawner.spawn(
            ctl_host.netns,
            [
                "controller",
                "--host",
                ctl_host.addr,
                "--port",
                "8080",
                "--db",
                str(db),
                # Nodes are registered by the runner, not by heartbeating agents (see docs).
                "--heartbeat-timeout",
                "86400",
            ],
            str(ctl_dir / "controller.log"),
            env=env,
        )
        self._manifest()
        spawner = self.spawner
        self.control.wait_healthy(60, alive=lambda: spawner.alive(self.ctl_pid))
        t0 = time.monotonic()
        c = self.control
        c.register(name="pub", role="publisher", addr=self.layout.publisher, port=1)
        for r, addr in self.layout.relays.items():
            c.register(name=r, role="relay", addr=addr, port=RELAY_PORT)
        for h, (addr, eps) in self.layout.hosts.items():
            c.register(
                name=h, role="receiver", addr=addr, port=ENDPOINT_PORT_BASE, capacity=len(eps)
            )
        # Jasper's stream first: an agent takes the first stream whose plan names its node, and
        # the H=0 baseline's stream (from a file) names the same nodes.
        hedges = sorted(
            {hd for n in self.s.configs if (hd := self.specs[n].hedge) is not None},
            key=lambda hd: (hd != self.s.hedge, hd),
        )
        endpoints = [
            (e, addr, ENDPOINT_PORT_BASE + j)
            for _, (addr, eps) in self.layout.hosts.items()
            for j, e in enumerate(eps)
        ]
        names = {(addr, port): e for e, addr, port in endpoints}
        tokens: dict[str, str] = {}
        for k, hedge in enumerate(hedges):
            stream_id = STREAM_ID + k
            c.create_stream(
                id=stream_id,
                name=f"md-h{hedge}",
                hedge=hedge,
                fanout=self.s.fanout,
                depth=self.s.depth,
                hold_ns=0,
                hold_policy="fixed",
                publisher="pub",
                rate_hint=self.s.rate,
            )
            stats = SubscriptionStats()

            def prog(f: float, _k: int = k) -> None:
                self.progress(f"subscribing MPs over REST (stream {_k + 1})", f)

            c.subscribe_all(stream_id, endpoints, stats, tokens, progress=prog)
            if stats.failures:
                raise RuntimeError(
                    f"{len(stats.failures)} subscriptions failed, first: {stats.failures[0]}"
                )
            tree = c.settled_tree(stream_id)
            (ctl_dir / f"tree-stream{stream_id}.json").write_text(json.dumps(tree))
            self.ctl_streams[hedge] = stream_id
            for ep in tree.get("endpoints", []):
                self.ctl_endpoint_names[str(ep["name"])] = names[(ep["addr"], int(ep["port"]))]
            topo = topology_from_tree(tree, names)
            # The data plane carries stream 1 in every configuration.
            doc = topo.to_dict()
            doc["stream"]["id"] = STREAM_ID
            self.tree_topos[hedge] = parse_topology(doc)
            self.control_summary[f"stream_h{hedge}"] = {
                "subscriptions": stats.summary(),
                "depth": tree.get("depth"),
                "fanout": tree.get("fanout"),
                "hedge": tree.get("hedge"),
                "relays_per_level": [len(level) for level in tree.get("levels", [])],
                "lemons": tree.get("lemons"),
                "predicted_oml_us": round((tree.get("predicted_oml_ns") or 0) / 1e3, 1),
                "plan_epoch": tree.get("plan_epoch"),
                "distinct_parents_min": min(
                    len(set(e.parents)) for _, e in self.tree_topos[hedge].endpoints()
                ),
            }
        self.control_summary["setup_s"] = round(time.monotonic() - t0, 2)
        (ctl_dir / "control.json").write_text(json.dumps(self.control_summary, indent=1))
        if self.s.hedge in self.tree_topos:
            self.view = TreeView.of(self.tree_topos[self.s.hedge])

    def close(self) -> None:
        """Stop every daemon, the spawner, and delete every namespace. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for detach in self._detach:
            try:
                detach()
            except Exception:
                log.exception("detaching a link-loss program")
        for pid in [*self.live.values(), self.ctl_pid]:
            if pid:
                _kill(pid, signal.SIGCONT)
                _kill(pid, signal.SIGKILL)
        if self.control is not None:
            try:
                self.control.close()
            except Exception:
                log.exception("closing the controller client")
        if self.spawner is not None:
            self.spawner.close()
        if self.timeref is not None:
            self.timeref.stop()
        self.net.teardown()
        try:
            restore_backlog(self._backlog_restore)
        except OSError:
            log.exception("restoring net.core.netdev_max_backlog")

    # -- daemons ------------------------------------------------------------------------------

    def _spawn(
        self, key: str, netns: str, argv: Sequence[str], block_dir: Path, *, agents: bool = False
    ) -> int:
        assert self.spawner is not None
        # Agents run without their latency prober (`--probe-port -1`; see spawner._run_cli):
        # the controller's measurement-driven placement gets no probe data in the emulation.
        # They heartbeat every AGENT_HEARTBEAT_S: the hold is fixed per block and nodes are
        # registered by the runner, so nothing needs them every second. (It barely moved the
        # controller's CPU at N=1000: ~44 CPU s per H=2 block at 4.5 msg/s against 54 at 6 msg/s
        # with 1 s heartbeats; its main cost there is elsewhere, not profiled yet.)
        overrides = {"probe_port": None, "heartbeat_s": AGENT_HEARTBEAT_S} if agents else None
        pid = self.spawner.spawn(
            netns, list(argv), str(block_dir / f"{key}.log"), overrides=overrides
        )
        self.live[key] = pid
        return pid

    def _credential_args(self, node: str, block_dir: Path) -> list[str]:
        """The daemon's own one-time join token (issued now for its node name) and where it
        keeps the credential it enrols for, fresh per block."""
        folder = block_dir / "credentials"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        join = folder / f"join-token-{node}"
        join.unlink(missing_ok=True)
        join.touch(mode=0o600)
        join.write_text(self.control.join_token(node))
        credential = folder / f"credential-{node}"
        credential.unlink(missing_ok=True)
        return ["--join-token-file", str(join), "--credential-file", str(credential)]

    def _source(self, spec: ConfigSpec, topo_path: Path, node: str, block_dir: Path) -> list[str]:
        """Where a daemon takes its plan from: the file, or the controller (agents)."""
        if not spec.agents:
            return ["--topology", str(topo_path)]
        host = self.net.hosts[node]
        return [
            "--controller",
            self.control.url,
            *self._credential_args(node, block_dir),
            "--data-addr",
            host.addr,
        ]

    def _clock_args(self, block_dir: Path) -> list[str]:
        """A receiver host's emulated clock, corrected by SNTP against the region's reference,
        steppable by the clock-step fault (SIGUSR1 + step file, overlay/clocksync.py)."""
        assert self.timeref is not None
        return [
            "--clock-offset-us",
            "0",
            "--ntp-server",
            self.timeref.server,
            "--clock-step-file",
            str(block_dir / "clock-step"),
        ]

    def _start_block_daemons(
        self, topo_path: Path, block_dir: Path, spec: ConfigSpec, fault: Fault | None = None
    ) -> None:
        """Start receivers (and relays unless unicast); wait for each one's ready file."""
        ready: list[Path] = []
        stepped = fault.target if fault is not None and fault.kind == "clock-step" else None

        def argv(kind: str, node: str) -> list[str]:
            flag = block_dir / f"ready-{node}"
            ready.append(flag)
            extra: list[str] = []
            if spec.agents and kind == "relay":
                extra = ["--port", str(RELAY_PORT)]
            if spec.agents and kind == "receiver":
                eps = self.layout.hosts[node][1]
                extra = ["--port-base", str(ENDPOINT_PORT_BASE), "--endpoints", str(len(eps))]
            return [
                kind,
                *self._source(spec, topo_path, node, block_dir),
                *extra,
                "--node-name",
                node,
                "--records",
                str(block_dir),
                "--ready-file",
                str(flag),
                "--fast-path",
                self.s.fast_path,
            ]

        for h in self.layout.hosts:
            rx = [*argv("receiver", h), *self.s.receiver_args]
            if h == stepped:
                rx += self._clock_args(block_dir)
            self._spawn(h, self.net.hosts[h].netns, rx, block_dir, agents=spec.agents)
        if spec.hedge is not None:
            used = {r.name for r in load_topology_file(topo_path).relays}
            for r in self.layout.relays:
                if r in used:
                    self._spawn(
                        r, self.net.hosts[r].netns, argv("relay", r), block_dir, agents=spec.agents
                    )
        self._manifest()
        assert self.spawner is not None
        # Agents first register, then long-poll their plan: give a loaded machine time. Each
        # relay's eBPF program costs ~0.3 s of verifier CPU to load (measured here), and they
        # all load at once.
        wait_s = 60 + (60 if spec.agents else 0) + len(self.layout.relays)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if all(f.exists() for f in ready):
                return
            dead = [k for k, pid in self.live.items() if not self.spawner.alive(pid)]
            if dead:
                log_tail = (block_dir / f"{dead[0]}.log").read_text()[-2000:]
                raise RuntimeError(f"daemon {dead[0]} exited at start:\n{log_tail}")
            time.sleep(0.05)
        missing = [f.name for f in ready if not f.exists()]
        raise RuntimeError(f"daemons not ready after {wait_s} s: {missing[:5]}")

    def _stop_daemons(self, block: int, timeout_s: float = 30.0) -> list[str]:
        assert self.spawner is not None
        errors: list[str] = []
        for pid in self.live.values():
            _kill(pid, signal.SIGCONT)
            _kill(pid, signal.SIGTERM)
        if not self.spawner.wait(list(self.live.values()), timeout_s):
            for key, pid in self.live.items():
                if self.spawner.alive(pid):
                    errors.append(f"{key} did not stop within {timeout_s:g} s; killed")
                    _kill(pid, signal.SIGKILL)
            self.spawner.wait(list(self.live.values()), 5.0)
        for key, pid in self.live.items():
            ex = self.spawner.exits.get(pid)
            role = "publisher" if key == "pub" else "relay" if key.startswith("r") else "receiver"
            if ex is None:
                continue
            self.processes.append(
                ProcessStat(role, key, block, ex.status, ex.utime_s + ex.stime_s, ex.maxrss_kb)
            )
        self.live.clear()
        self._manifest()
        return errors

    # -- blocks -------------------------------------------------------------------------------

    def _hold_for_next_jasper(self) -> int:
        """Max over endpoints of their delay percentile in the latest H=hedge tree block (the
        simulator's rule, one block behind instead of one window behind), plus extra.

        The delay is send to when the receiver had the copy in hand: in a tree-without-hold
        block each pair's release is the moment its receiver processed the copy, which on
        this machine trails the (link model's) arrival by the receive loop's lag (35-45 ms
        mean at N=1000, while the fan-out holds both cores); a deadline between arrival and
        that moment finds nothing to release. Blocks with a hold only show the arrival (their
        release is the deadline), so they count only when no tree-without-hold block ran."""
        held_tree = ("tree-nohold", "jasper", "jasper-file", "jasper-agents")
        usable = [
            b for b in self.blocks if b.config in held_tree and b.fault is None and len(b.releases)
        ]
        nohold = [b for b in usable if b.config == "tree-nohold"]
        if not usable:
            return max(self.s.min_hold_ns, 2_000_000)
        b = (nohold or usable)[-1]
        d = b.releases.records
        sent = b.sent
        # Per (message, endpoint) pair: a record stands for `count` messages from `seq` on.
        src, offset = message_offsets(d["count"])
        order = np.argsort(sent["seq"])
        idx = np.searchsorted(sent["seq"][order], d["seq"][src] + offset.astype(np.uint64))
        idx = np.minimum(idx, len(sent) - 1)
        send = sent["send_time_ns"][order][idx]
        had = np.maximum(d["arrival_ns"], d["release_ns"]) if nohold else d["arrival_ns"]
        owd = had[src] - send
        ep = d["endpoint"][src]
        est = max(float(np.percentile(owd[ep == k], self.s.hold_percentile)) for k in np.unique(ep))
        hold = max(self.s.min_hold_ns, int(est) + self.s.extra_hold_ns)
        if hold > MAX_HOLD_NS:
            # Delays of seconds mean the machine fell behind the offered rate (N=1000 at
            # 300 msg/s with user-space relays: 185 msg/s achieved, 19 s delays): say so, and
            # run the next block with the longest hold a plan may carry instead of failing.
            self.notes.append(
                f"block {b.index}: delay p{self.s.hold_percentile:g} {est / 1e9:.1f} s, the "
                f"machine fell behind the offered rate; the next hold is capped at "
                f"{MAX_HOLD_NS / 1e9:g} s"
            )
            hold = MAX_HOLD_NS
        return hold

    def run_block(
        self, config: str, messages: int, *, fault: Fault | None = None, index: int = 0
    ) -> BlockResult:
        assert self.spawner is not None
        spec = self.specs[config]
        hold_ns = self._hold_for_next_jasper() if spec.hold else 0
        rate = self.s.rate
        if config == CALIBRATION:
            # Every copy long before its deadline, and one message at a time (the next is
            # sent after this one's release): what is left of DWS is the machine's floor.
            hold_ns = max(2 * hold_ns, hold_ns + 5_000_000)
            rate = min(rate, 1e9 / (1.1 * hold_ns))
        planned = self.tree_topos.get(spec.hedge) if spec.hedge is not None else None
        if planned is not None:
            doc = planned.to_dict()
            doc["stream"]["hold_ns"] = hold_ns
            doc["plan_epoch"] = index + 1
            doc["link_model"] = dict(self.s.link_model) if self.s.link_model else None
            topo = parse_topology(doc)
        else:
            plan = None if spec.hedge is None else self.plans[spec.hedge]
            topo = build_topology(
                self.layout,
                plan=plan,
                hold_ns=hold_ns,
                hedge=spec.hedge or 0,
                link_model=self.s.link_model,
                plan_epoch=index + 1,
                auth=self.auth,
            )
        block_dir = self.out / "blocks" / f"{index:03d}-{config}"
        if block_dir.exists():
            # An earlier run in the same folder: its ready files and records are not ours.
            shutil.rmtree(block_dir)
        block_dir.mkdir(parents=True, exist_ok=True)
        topo_path = block_dir / "topology.json"
        topo_path.write_text(json.dumps(topo.to_dict()))
        if spec.agents:
            assert spec.hedge is not None
            # The hold reaches the publisher the way a deployment's would: the stream's
            # (fixed) hold at the controller, in the publisher's config.
            self.control.set_hold(self.ctl_streams[spec.hedge], hold_ns)
        t_start = time.monotonic()
        self._start_block_daemons(topo_path, block_dir, spec, fault)
        if spec.agents and not {"--no-realtime", "--no-realtime-loop"} & set(self.s.receiver_args):
            # A receiver started from a file puts its event loop in SCHED_FIFO itself; one
            # under an agent does not (overlay/agent.py): switch it now, after start-up, so the
            # two modes differ only in where the plan comes from.
            loops_realtime([self.live[h] for h in self.layout.hosts if h in self.live])
        startup_s = time.monotonic() - t_start
        time.sleep(self.s.settle_s)
        daemons = list(self.live.values())
        # The block's figures (machine CPU, own CPU, kernel drops, wall time) cover the
        # publisher's sending only: under the controller it first waits, up to
        # session_wait_s, for its session's config to reach every node, and at N=1000 that
        # config storm alone keeps 2 cores busy for tens of seconds. Sampled again when the
        # publisher starts sending (its progress file appears); these are the fallback.
        t0 = time.monotonic()
        cpu0 = cpu_sample()
        drops0 = backlog_drops()
        own0 = process_cpu_s(daemons)
        ctl0 = process_cpu_s([self.ctl_pid]) if self.ctl_pid else 0.0
        session_wait_s = 0.0
        pub_extra: list[str] = []
        if self.s.batch_us > 0:
            pub_extra += ["--batch-us", f"{self.s.batch_us:g}"]
        if spec.agents:
            assert spec.hedge is not None
            pub_extra += ["--stream", str(self.ctl_streams[spec.hedge])]
            # Its new session reaches every node in a new config: at N=1000 that takes the
            # controller and 125 agents more than the default 10 s on 2 cores, and a
            # publisher that sends before would have its copies refused by the nodes.
            session_wait_s = 30.0 + len(self.layout.relays) + len(self.layout.hosts)
            pub_extra += ["--session-wait-s", f"{session_wait_s:g}"]
        self._spawn(
            "pub",
            self.net.hosts["pub"].netns,
            [
                "publisher",
                *self._source(spec, topo_path, "pub", block_dir),
                *pub_extra,
                "--node-name",
                "pub",
                "--rate",
                f"{rate:g}",
                "--duration",
                f"{messages / rate:.3f}",
                "--records",
                str(block_dir),
            ],
            block_dir,
            agents=spec.agents,
        )
        injector = None
        gates: dict[str, NodeGate] = {}
        if fault is not None:
            gates = self._gates_for(fault)
            injector = FaultInjector(
                [fault],
                dict(self.live),
                link_loss=self._link_loss,
                clock_step=lambda node, step_ns: self._clock_step(block_dir, node, step_ns),
                gates=gates,
            )
        pub_pid = self.live["pub"]
        expected_s = messages / rate
        progress_file = block_dir / "progress"
        sending = False
        while not self.spawner.wait([pub_pid], 0.5 if sending else 0.02):
            if not sending and progress_file.exists():
                # The publisher's first message: the fault schedule and the figures start.
                sending = True
                t0 = time.monotonic()
                cpu0 = cpu_sample()
                drops0 = backlog_drops()
                own0 = process_cpu_s(daemons)
                ctl0 = process_cpu_s([self.ctl_pid]) if self.ctl_pid else 0.0
                if injector is not None:
                    injector.start()
            try:
                sent_so_far = int(progress_file.read_text() or 0)
            except (OSError, ValueError):
                sent_so_far = 0
            self._tick(min(1.0, sent_so_far / messages))
            if time.monotonic() - t0 > 3 * expected_s + 60 + (0 if sending else session_wait_s):
                _kill(pub_pid, signal.SIGTERM)
                self.notes.append(f"block {index}: publisher overran; stopped")
                self.spawner.wait([pub_pid], 10)
                break
        cpu1 = cpu_sample()
        # The publisher has exited (its CPU is gone from /proc): add it from wait4.
        pub_exit = self.spawner.exits.get(pub_pid)
        own_s = process_cpu_s(daemons) - own0
        ctl_s = (process_cpu_s([self.ctl_pid]) - ctl0) if self.ctl_pid else 0.0
        if pub_exit is not None:
            own_s += pub_exit.utime_s + pub_exit.stime_s
        t1 = time.monotonic()
        if injector is not None:
            injector.stop()
        # Let the last messages clear the tree and the hold before stopping.
        time.sleep(0.3 + hold_ns / 1e9)
        errors = self._stop_daemons(index)
        for node, gate in gates.items():
            self.notes.append(
                f"block {index}: {node}'s network gate dropped {gate.dropped()} packets while "
                "its relay was down or paused"
            )
            gate.remove()
        if spec.agents:
            self._normalize_agent_records(block_dir)
        sent, releases = load_records(block_dir)
        achieved = 0.0
        if len(sent) > 1:
            span = float(sent["send_time_ns"].max() - sent["send_time_ns"].min()) / 1e9
            achieved = (len(sent) - 1) / span if span > 0 else 0.0
        result = BlockResult(
            index=index,
            config=config,
            fault=fault,
            sent=sent,
            releases=releases,
            hold_ns=hold_ns,
            offered_rate=rate,
            achieved_rate=achieved,
            cpu_fraction=cpu_fraction(cpu0, cpu1),
            own_cpu_fraction=own_s / max(1e-9, (t1 - t0) * (os.cpu_count() or 1)),
            startup_s=startup_s,
            controller_cpu_s=ctl_s,
            wall_s=t1 - t0,
            events=list(injector.events) if injector else [],
            daemon_errors=errors,
            data_paths=data_paths(_block_statuses(block_dir)),
            backlog_drops=backlog_drops() - drops0,
        )
        self.blocks.append(result)
        (block_dir / "block.json").write_text(
            json.dumps(
                {
                    **block_meta(result),
                    "processes": [asdict(p) for p in self.processes if p.block == index],
                }
            )
        )
        return result

    def _normalize_agent_records(self, block_dir: Path) -> None:
        """Agent-run records name the controller's stream and endpoint keys: rename them to
        the emulation's, keeping the originals under raw/."""
        raw = block_dir / "raw"
        raw.mkdir(exist_ok=True)
        for path in [*block_dir.glob("*sent*.npy"), *block_dir.glob("*deliver*.npy")]:
            arr = np.load(path)
            path.rename(raw / path.name)
            arr["stream_id"] = STREAM_ID
            if "endpoint" in (arr.dtype.names or ()):
                arr["endpoint"] = [
                    self.ctl_endpoint_names.get(str(e), str(e)) for e in arr["endpoint"]
                ]
            np.save(path, arr)
        for path in block_dir.glob("releases-*.npz"):
            rel = load_releases(path)
            path.rename(raw / path.name)
            recs = rel.records.copy()
            recs["stream_id"] = STREAM_ID
            names = tuple(self.ctl_endpoint_names.get(e, e) for e in rel.endpoints)
            save_releases(path, Releases(recs, names, rel.parents))

    def _clock_step(self, block_dir: Path, node: str, step_ns: int) -> None:
        """Step `node`'s emulated clock: the step file says by how much, SIGUSR1 says now."""
        step_file = block_dir / "clock-step"
        tmp = step_file.with_suffix(".tmp")
        tmp.write_text(str(int(step_ns)))
        tmp.replace(step_file)
        os.kill(self.live[node], signal.SIGUSR1)

    def _gates_for(self, fault: Fault) -> dict[str, NodeGate]:
        """A network gate on the host of a relay that the fault kills or pauses, when relays may
        forward in the kernel (there the process's death or stop alone stops nothing)."""
        if fault.kind not in ("kill-relay", "pause-relay") or self.s.fast_path == "user":
            return {}
        return {fault.target: NodeGate(self.net.hosts[fault.target].netns)}

    def _link_loss(self, src: str, dst: str, loss: float) -> Callable[[], None]:
        detach = attach_linkloss(self.net.hosts[dst].netns, "eth0", self.net.hosts[src].addr, loss)
        self._detach.append(detach)
        return detach

    # -- the whole run ------------------------------------------------------------------------

    def schedule(self) -> list[tuple[str, int, Fault | None]]:
        """Blocks in order: rounds of every configuration (order rotating each round, the
        tree-without-hold block before Jasper's in the first round so Jasper has a hold), then
        one fault block per fault."""
        s = self.s
        configs = list(s.configs)
        if "jasper" in configs and "tree-nohold" in configs:
            configs.remove("tree-nohold")
            configs.insert(0, "tree-nohold")
        out: list[tuple[str, int, Fault | None]] = []
        for k in range(s.blocks_per_config()):
            rot = configs[k % len(configs) :] + configs[: k % len(configs)] if k else configs
            out += [(c, s.block_messages, None) for c in rot]
        if not s.tau_ns:
            # After the first block, so its delays size the calibration's hold.
            out.insert(1, (CALIBRATION, s.calibration_messages + s.warmup_messages, None))
        if s.faults:
            faults = self.default_faults()
            if not self.clock_step_ok:
                faults = [f for f in faults if f.kind != "clock-step"]
            jasper = "jasper" if "jasper" in s.configs else "jasper-file"
            out += [(jasper, s.fault_block_messages, f) for f in faults]
        return out

    def default_faults(self) -> list[Fault]:
        """One of each: kill a level-1 relay, kill a receiver host, pause a relay in bursts,
        step one receiver host's emulated clock, loss on one relay-to-host link."""
        s = self.s
        at = 0.4 * s.fault_block_messages / s.rate
        levels = self.view.levels
        level1 = levels[1] if len(levels) > 1 else levels[0]
        lower = levels[-1]
        victim_relay = level1[len(level1) // 2]
        paused = lower[len(lower) // 3]
        last_hosts = list(self.layout.hosts)
        victim_host = last_hosts[len(last_hosts) // 2]
        stepped_host = last_hosts[len(last_hosts) // 4]
        # A link that carries own-child copies: from a last-level relay to one of its hosts.
        child = self.view.children[lower[len(lower) // 4]][0]
        lossy_host = self.layout.host_of()[child] if child.startswith("e") else child
        loss_src = lower[len(lower) // 4]
        return [
            Fault(kind="kill-relay", target=victim_relay, at_s=at),
            Fault(kind="kill-host", target=victim_host, at_s=at),
            Fault(
                kind="pause-relay",
                target=paused,
                at_s=at,
                bursts=12,
                burst_gap_s=0.25,
                seed=s.seed,
            ),
            Fault(kind="clock-step", target=stepped_host, at_s=at, step_ns=s.clock_step_ns),
            Fault(
                kind="link-loss",
                target=f"{loss_src}->{lossy_host}",
                at_s=at,
                loss=0.3,
                duration_s=min(5.0, 0.3 * s.fault_block_messages / s.rate),
            ),
        ]

    def run(self) -> list[BlockResult]:
        plan = self.schedule()
        total = sum(m for _, m, _ in plan)
        done = 0
        for i, (config, messages, fault) in enumerate(plan):
            label = config if fault is None else f"{config}+{fault.kind}"
            self._progress_state = (f"block {i + 1}/{len(plan)} {label}", done, messages, total)
            b = self.run_block(config, messages, fault=fault, index=i)
            done += messages
            if config == CALIBRATION:
                self.calibrate(b)
            if b.daemon_errors:
                self.notes += [f"block {i}: {e}" for e in b.daemon_errors]
        return self.blocks

    def calibrate(self, b: BlockResult) -> None:
        """The headline tau from the calibration block: p90 of its DWS over messages that
        reached every endpoint before their deadline, rounded up to 1, 2 or 5 x 10^k µs."""
        from overlay.emulation.report import pair_matrix

        sent, deliv = b.scored(self.s.warmup_messages)
        m = pair_matrix(sent, deliv, self.plan.leaf_names())
        ok = m.got.all(axis=1) & ~m.late(True).any(axis=1)
        r = m.release_ns[ok]
        dws = r.max(axis=1) - r.min(axis=1) if len(r) else np.zeros(0, np.int64)
        doc: dict[str, Any] = {
            "block": b.index,
            "hold_us": round(b.hold_ns / 1e3),
            "messages": len(m.send_ns),
            "complete_on_time": int(ok.sum()),
            "late_pairs": int(m.late(True).sum()),
            "lost_pairs": int((~m.got).sum()),
        }
        if len(dws) >= 10:
            p50, p90, p99 = (float(np.percentile(dws, q)) for q in (50, 90, 99))
            doc.update(dws_p50_us=round(p50 / 1e3, 1), dws_p90_us=round(p90 / 1e3, 1))
            doc["dws_p99_us"] = round(p99 / 1e3, 1)
            if not self.s.tau_ns:
                self.tau_ns = nice_ceil_ns(p90)
        doc["tau_us"] = self.tau_ns / 1e3 if self.tau_ns else None
        self.calibration = doc
        (self.out / "calibration.json").write_text(json.dumps(doc, indent=1))

    def headline_tau_ns(self) -> int:
        """The tau of the headline: settings, calibration, else N x 20 µs / cores."""
        if self.tau_ns:
            return self.tau_ns
        ncpu = os.cpu_count() or 1
        self.notes.append("no calibration: tau from N x 20 µs / cores")
        return max(100_000, nice_ceil_ns(20_000 * self.s.receivers / ncpu))

    def _tick(self, frac: float) -> None:
        label, done, messages, total = self._progress_state
        self.progress(label, (done + frac * messages) / max(1, total))


def nice_ceil_ns(ns: float) -> int:
    """The smallest 1, 2 or 5 x 10^k µs at or above `ns` (at least 10 µs)."""
    us = max(10.0, ns / 1e3)
    k = 10 ** math.floor(math.log10(us))
    for f in (1, 2, 5, 10):
        if f * k >= us - 1e-9:
            return int(f * k * 1000)
    return int(10 * k * 1000)


def loops_realtime(pids: Sequence[int]) -> int:
    """Every SCHED_OTHER thread of `pids` into SCHED_FIFO at the data plane's loop priority
    (release threads already sit higher); how many processes were switched."""
    from overlay.release import LOOP_PRIORITY

    switched = 0
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        ok = False
        for tid in tids:
            with contextlib.suppress(OSError):
                if os.sched_getscheduler(tid) == os.SCHED_OTHER:
                    os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(LOOP_PRIORITY))
                ok = True
        switched += ok
    return switched


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _group_processes(
    processes: Sequence[ProcessStat],
) -> dict[tuple[str, str], list[ProcessStat]]:
    out: dict[tuple[str, str], list[ProcessStat]] = {}
    for p in processes:
        out.setdefault((p.node, p.role), []).append(p)
    return out


def _vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set of a live process, MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def load_topology_file(path: Path) -> Topology:
    return parse_topology(json.loads(path.read_text()))


def load_records(block_dir: Path) -> tuple[np.ndarray, Releases]:
    """All sent records (.npy) and release records (releases-*.npz, or the per-message
    deliveries-*.npy of older runs) the block's daemons wrote."""
    sent = [np.load(p) for p in sorted(block_dir.glob("*sent*.npy"))]
    sent_arr = np.concatenate(sent) if sent else np.zeros(0, dtype=SENT_DTYPE)
    return sent_arr.astype(SENT_DTYPE), load_run_releases(block_dir)


def block_meta(b: BlockResult) -> dict[str, Any]:
    """What a block's records do not say about it, for reading a run back later."""
    return {
        "index": b.index,
        "config": b.config,
        "fault": asdict(b.fault) if b.fault else None,
        "hold_ns": b.hold_ns,
        "offered_rate": b.offered_rate,
        "achieved_rate": b.achieved_rate,
        "cpu_fraction": b.cpu_fraction,
        "own_cpu_fraction": b.own_cpu_fraction,
        "startup_s": b.startup_s,
        "wall_s": b.wall_s,
        "controller_cpu_s": b.controller_cpu_s,
        "events": [{**asdict(e), "fault": asdict(e.fault)} for e in b.events],
        "daemon_errors": b.daemon_errors,
        "data_paths": b.data_paths,
        "backlog_drops": b.backlog_drops,
    }


def _block_statuses(block_dir: Path) -> dict[str, Any]:
    """The status files the block's daemons wrote when they stopped, by node."""
    out: dict[str, Any] = {}
    for path in sorted(block_dir.glob("status-*.json")):
        try:
            out[path.stem.removeprefix("status-")] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a daemon killed by a fault writes none, or half of one
    return out


def reload_run(out_dir: Path, settings: EmulationSettings | None = None) -> Emulation:
    """An Emulation whose blocks are read back from a finished (or killed) run's folder, for
    `analyse` to report on again. Nothing is started."""
    from overlay.emulation.control import TreeView

    run_file = out_dir / "run.json"
    if settings is None:
        if not run_file.exists():
            raise FileNotFoundError(f"{run_file} missing: pass the run's settings")
        raw = json.loads(run_file.read_text())["settings"]
        raw["configs"] = tuple(raw["configs"])
        raw["receiver_args"] = tuple(raw.get("receiver_args", ()))
        settings = EmulationSettings(**raw)
    settings = EmulationSettings(**{**asdict(settings), "out_dir": str(out_dir)})
    em = Emulation(settings)
    ctl = out_dir / "controller" / "control.json"
    if ctl.exists():
        em.control_summary = json.loads(ctl.read_text())
    cal = out_dir / "calibration.json"
    if cal.exists():
        em.calibration = json.loads(cal.read_text())
        if not settings.tau_ns and em.calibration.get("tau_us"):
            em.tau_ns = int(em.calibration["tau_us"] * 1000)
    # Runs written before block.json existed: take what their report.json said per block.
    old_blocks: dict[int, dict[str, Any]] = {}
    old_events: dict[int, dict[str, Any]] = {}
    if (out_dir / "report.json").exists():
        old = json.loads((out_dir / "report.json").read_text())
        old_blocks = {int(b["index"]): b for b in old.get("blocks", [])}
        old_events = {int(f["block"]): f["event"] for f in old.get("faults", []) if "event" in f}
    for block_dir in sorted((out_dir / "blocks").glob("[0-9][0-9][0-9]-*")):
        index_s, config = block_dir.name.split("-", 1)
        meta_file = block_dir / "block.json"
        meta: dict[str, Any] = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        if not meta and int(index_s) in old_blocks:
            ob = old_blocks[int(index_s)]
            meta = {
                "cpu_fraction": ob["machine_cpu_percent"] / 100,
                "own_cpu_fraction": (ob.get("own_cpu_percent") or 0) / 100,
                "startup_s": ob.get("startup_s", 0.0),
                "wall_s": ob["wall_s"],
                "hold_ns": ob["hold_us"] * 1000,
            }
        sent, deliv = load_records(block_dir)
        if len(sent) == 0:
            em.notes.append(f"block {block_dir.name}: no records (run stopped?)")
            continue
        topo = load_topology_file(block_dir / "topology.json")
        fault = Fault(**meta["fault"]) if meta.get("fault") else None
        if fault is None and int(index_s) in old_events:
            e = old_events[int(index_s)]
            fault = next(
                (f for f in em.default_faults() if f.kind == e["kind"]),
                Fault(kind=e["kind"], target=e["target"], at_s=0.0),
            )
            fault = Fault(**{**asdict(fault), "target": e["target"]})
            meta["events"] = [
                {
                    "fault": asdict(fault),
                    "start_ns": e["start_ns"],
                    "end_ns": e["end_ns"],
                    "pauses_ns": [int(p * 1000) for p in e["pauses_us"]],
                    "pid": e["pid"],
                    "error": e["error"],
                }
            ]
        events = []
        for e in meta.get("events", []):
            ev = FaultEvent(Fault(**e["fault"]))
            ev.start_ns, ev.end_ns, ev.pid, ev.error = (
                e["start_ns"],
                e["end_ns"],
                e["pid"],
                e["error"],
            )
            ev.pauses_ns = list(e["pauses_ns"])
            events.append(ev)
        span = float(sent["send_time_ns"].max() - sent["send_time_ns"].min()) / 1e9
        em.blocks.append(
            BlockResult(
                index=int(index_s),
                config=config,
                fault=fault,
                sent=sent,
                releases=deliv,
                hold_ns=int(meta.get("hold_ns", topo.stream.hold_ns)),
                offered_rate=float(meta.get("offered_rate", settings.rate)),
                achieved_rate=float(
                    meta.get("achieved_rate", (len(sent) - 1) / span if span > 0 else 0.0)
                ),
                cpu_fraction=float(meta.get("cpu_fraction", math.nan)),
                own_cpu_fraction=float(meta.get("own_cpu_fraction", 0.0)),
                startup_s=float(meta.get("startup_s", 0.0)),
                wall_s=float(meta.get("wall_s", span)),
                controller_cpu_s=float(meta.get("controller_cpu_s", 0.0)),
                events=events,
                daemon_errors=list(meta.get("daemon_errors", [])),
                data_paths=str(meta.get("data_paths", "")),
                backlog_drops=int(meta.get("backlog_drops", 0)),
            )
        )
        em.processes += [ProcessStat(**p) for p in meta.get("processes", [])]
        if config in ("jasper", "jasper-file", "jasper-agents") and topo.relays:
            em.view = TreeView.of(topo)
            if (out_dir / "controller" / "tree-stream1.json").exists():
                em.tree_topos[settings.hedge] = topo
    em.closed = True  # nothing to tear down
    return em


def settings_dict(s: EmulationSettings) -> dict[str, Any]:
    d = asdict(s)
    d["configs"] = list(s.configs)
    return d


# --- analysis --------------------------------------------------------------------------------


def clock_step_cost(
    m: Any, victims: np.ndarray, event: FaultEvent, *, tau_ns: int
) -> dict[str, Any]:
    """What a clock step of the `victims` endpoints' host cost, from true-time records: pairs
    released more than tau from their deadline ("mistimed"), the worst release error, and how
    long releases stayed off (step to the last mistimed release).
    Returns the (m, e) mistimed matrix under "mistimed" (victim columns only)."""
    on_time = m.got & ~m.late(True)
    err = np.where(on_time, m.release_ns - m.deadline_ns[:, None], 0)
    off = on_time & (np.abs(err) > tau_ns)
    mistimed = off & victims[None, :]
    after = m.send_ns >= event.start_ns if event.start_ns else np.ones(len(m.send_ns), bool)
    others = int((~victims).sum())
    victim_err = err[:, victims][on_time[:, victims]] if victims.any() else np.zeros(0)
    rel = m.release_ns[mistimed]
    wrong_ms = (
        round(float(rel.max() - event.start_ns) / 1e6, 1) if len(rel) and event.start_ns else None
    )
    return {
        "mistimed": mistimed,
        "victim_endpoints": int(victims.sum()),
        "victim_mistimed_pairs": int(mistimed.sum()),
        "victim_release_error_max_us": (
            round(float(np.abs(victim_err).max()) / 1e3, 1) if len(victim_err) else None
        ),
        "last_mistimed_ms": wrong_ms,
        # The same block's other hosts, after the step: the machine's own noise at this tau.
        "victim_mistimed_per_endpoint": round(
            float(mistimed[after].sum()) / max(1, int(victims.sum())), 2
        ),
        "others_mistimed_per_endpoint": (
            round(float(off[after][:, ~victims].sum()) / others, 2) if others else None
        ),
    }


def _concat(parts: Sequence[np.ndarray], dtype: np.dtype[Any]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def analyse(em: Emulation) -> tuple[dict[str, Any], dict[str, str]]:
    """The report document and its plots (base64 PNG) from the blocks of a finished run."""
    from jasper.linkmodel import parse_link_model
    from overlay.emulation import report as rp
    from overlay.emulation.faults import FaultCost, fault_cost

    s = em.s
    tau_ns = em.headline_tau_ns()
    leaves = em.plan.leaf_names()
    configs: list[rp.ConfigResult] = []
    for name in s.configs:
        spec = em.specs[name]
        blocks = [b for b in em.blocks if b.config == name and b.fault is None]
        scored = [b.scored(s.warmup_messages) for b in blocks]
        sent = _concat([x[0] for x in scored], SENT_DTYPE)
        deliv = concat_releases([x[1] for x in scored]) if scored else empty_releases()
        fair, figures = rp.config_analysis(
            sent,
            deliv,
            leaves,
            stream_id=STREAM_ID,
            has_deadline=spec.hold,
            tau_ns=tau_ns,
        )
        configs.append(
            rp.ConfigResult(
                name=name,
                description=spec.description,
                has_deadline=spec.hold,
                fairness=fair,
                figures=figures,
                matrix=rp.pair_matrix(sent, deliv, leaves),
                blocks=len(blocks),
                offered_rate=s.rate,
                achieved_rate=float(np.mean([b.achieved_rate for b in blocks])) if blocks else 0,
                cpu_fraction=float(np.mean([b.cpu_fraction for b in blocks])) if blocks else 0,
            )
        )
    rows = [c.row() for c in configs]
    for row, name in zip(rows, s.configs, strict=True):
        blocks = [b for b in em.blocks if b.config == name and b.fault is None]
        own = [b.own_cpu_fraction for b in blocks]
        row["own_cpu_percent"] = round(100 * float(np.mean(own)), 1) if own else None
        ncpu = os.cpu_count() or 1
        ctl = [b.controller_cpu_s / max(1e-9, b.wall_s * ncpu) for b in blocks]
        row["controller_cpu_percent"] = round(100 * float(np.mean(ctl)), 1) if ctl else None
        row["hold_us"] = [round(b.hold_ns / 1e3) for b in blocks] if em.specs[name].hold else None
        row["data_paths"] = sorted({b.data_paths for b in blocks if b.data_paths})
        row["backlog_drops"] = sum(b.backlog_drops for b in blocks)
    taus_us = rp.table_taus_us(tau_ns / 1e3)
    for row, c in zip(rows, configs, strict=True):
        row["p_fair_at"] = rp.p_fair_columns(c, taus_us)
    table = rp.format_pfair_table(rows, tau_ns / 1e3) + "\n\n" + rp.format_table(rows)

    # Faults: what each cost.
    host_of = em.layout.host_of()
    fault_rows: list[dict[str, Any]] = []
    killed: set[str] = set()
    for b in em.blocks:
        if b.fault is None:
            continue
        sent, deliv = b.scored(s.warmup_messages)
        m = rp.pair_matrix(sent, deliv, leaves)
        late, lost = m.late(True), ~m.got
        victims = np.zeros(len(leaves), dtype=bool)
        if b.fault.kind == "kill-host":
            victims = np.array([host_of[e] == b.fault.target for e in leaves])
        if b.fault.kind == "kill-relay":
            killed.add(b.fault.target)
        event = b.events[0] if b.events else FaultEvent(b.fault, error="fault did not run")
        extra: dict[str, Any] = {}
        if b.fault.kind == "clock-step":
            # The stepped host's endpoints arrive on time but release off their deadline
            # (in true time) until its next SNTP burst corrects the clock: "mistimed" pairs.
            victims = np.array([host_of[e] == b.fault.target for e in leaves])
            extra = clock_step_cost(m, victims, event, tau_ns=tau_ns)
            # The stepped daemon's own account: when its next SNTP burst corrected the step.
            done = em.out / "blocks" / f"{b.index:03d}-{b.config}" / "clock-step.corrected"
            if done.exists():
                c = json.loads(done.read_text())
                extra["corrected_after_ms"] = round(
                    (c["corrected_at_ns"] - c["stepped_at_ns"]) / 1e6, 1
                )
                extra["measured_offset_us"] = round(c["measured_offset_ns"] / 1e3, 1)
                extra["error_after_correction_us"] = round(c["error_after_ns"] / 1e3, 1)
            late = late | extra.pop("mistimed")
        # A clock step's cost is on its own host's endpoints; other faults' victims (a killed
        # host's endpoints) are reported apart from everyone else's cost.
        cols = victims if b.fault.kind == "clock-step" else ~victims
        cost: FaultCost = fault_cost(event, m.send_ns, late[:, cols], lost[:, cols])
        row = cost.to_dict()
        row.update(extra)
        row.update(
            config=b.config,
            victim_pairs=int(lost[:, victims].sum()),
            victim_endpoints=int(victims.sum()),
            error=event.error,
            event=event.to_dict(),
            hold_us=round(b.hold_ns / 1e3),
            block=b.index,
        )
        fault_rows.append(row)

    # Processes: CPU and peak memory per role.
    procs: list[dict[str, Any]] = []
    for role in ("publisher", "relay", "receiver"):
        ps = [p for p in em.processes if p.role == role]
        if not ps:
            continue
        procs.append(
            {
                "role": role,
                "count": len({p.node for p in ps}),
                "runs": len(ps),
                "cpu_s_total": round(sum(p.cpu_s for p in ps), 2),
                "cpu_s_max": round(max(p.cpu_s for p in ps), 3),
                "maxrss_mb_max": round(max(p.maxrss_kb for p in ps) / 1024, 1),
                "abnormal_exits": sum(1 for p in ps if p.status not in (0, -9)),
            }
        )
    if em.ctl_pid and em.spawner is not None and em.spawner.alive(em.ctl_pid):
        procs.append(
            {
                "role": "controller",
                "count": 1,
                "runs": 1,
                "cpu_s_total": round(process_cpu_s([em.ctl_pid]), 2),
                "cpu_s_max": None,
                "maxrss_mb_max": _vm_hwm_mb(em.ctl_pid),
            }
        )
    import resource

    procs.append(
        {
            "role": "runner",
            "count": 1,
            "runs": 1,
            "cpu_s_total": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_utime
                + resource.getrusage(resource.RUSAGE_SELF).ru_stime,
                2,
            ),
            "cpu_s_max": None,
            "maxrss_mb_max": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    )

    scored_blocks = [b for b in em.blocks if b.fault is None]
    known_cpu = [b.cpu_fraction for b in scored_blocks if not math.isnan(b.cpu_fraction)]
    machine_cpu = max(known_cpu, default=0.0)
    timing_valid = machine_cpu <= s.cpu_limit and len(known_cpu) == len(scored_blocks)
    if len(known_cpu) < len(scored_blocks):
        em.notes.append("machine CPU was not recorded for some blocks: timing not validated")
    by_name = {c.name: c for c in configs}
    comparisons: dict[str, Any] = {}
    if "jasper" in by_name:
        jrow = next(r for r in rows if r["config"] == "jasper")
        for row in rows:
            if row["config"] in ("jasper", "jasper-file", "jasper-agents"):
                continue
            per_tau = []
            for jc, bc in zip(jrow["p_fair_at"], row["p_fair_at"], strict=True):
                per_tau.append(
                    {
                        "tau_us": jc["tau_us"],
                        "jasper_p_fair": jc["p_fair"],
                        "baseline_p_fair": bc["p_fair"],
                        "jasper_above": jc["p_fair"] > bc["p_fair"],
                        "cis_disjoint": jc["ci"][0] > bc["ci"][1],
                    }
                )
            head = next(x for x in per_tau if x["tau_us"] == tau_ns / 1e3)
            comparisons[row["config"]] = {**head, "by_tau": per_tau}
    model = parse_link_model(s.link_model) if s.link_model else None
    lemon_nodes = sorted(
        n for n in (*em.plan.relays(), *leaves) if model is not None and model.is_lemon(n)
    )
    summary = {
        "receivers": s.receivers,
        "receiver_hosts": len(em.layout.hosts),
        "relays": len(em.layout.relays),
        "namespaces": len(em.net.hosts) + 1,
        "tree": {"depth": em.plan.depth, "fanout": s.fanout, "hedge": s.hedge},
        "blocks": len(em.blocks),
        "messages_scored_per_config": {c.name: c.fairness.messages for c in configs},
        "offered_rate": s.rate,
        "machine_cpu_max_percent": round(100 * machine_cpu, 1),
        "timing_valid": timing_valid,
        "tau_us": tau_ns / 1e3,
        "tau_from": "settings" if s.tau_ns else "calibration" if em.tau_ns else "formula",
        "calibration": em.calibration,
        "jasper_vs_baselines": comparisons,
        "lemons": lemon_nodes,
        "trees_from": "controller (REST)" if em.tree_topos else "jasper.tree.tree_shape",
        "data_paths": {r["config"]: r["data_paths"] for r in rows},
        "control_plane": em.control_summary,
        "notes": em.notes,
    }
    doc: dict[str, Any] = {
        "summary": summary,
        "timing_valid": timing_valid,
        "cpu_limit_percent": round(100 * s.cpu_limit),
        "table": rows,
        "table_text": table,
        "fairness": {c.name: c.fairness.to_dict() for c in configs},
        "p_fair_by_tau_us": {
            c.name: dict(
                zip(
                    [str(t) for t in rp.TAU_LADDER_US],
                    rp.p_fair_curve(c, [t * 1000 for t in rp.TAU_LADDER_US]),
                    strict=True,
                )
            )
            for c in configs
        },
        "p_fair_ladder": (ladder := rp.p_fair_ladder(configs)),
        "ladder_text": rp.format_ladder(ladder, rp.TAU_LADDER_US[2:]),
        "faults": fault_rows,
        "processes": procs,
        "process_list": [
            {
                "node": node,
                "role": role,
                "blocks": len(ps),
                "cpu_s": round(sum(p.cpu_s for p in ps), 3),
                "maxrss_mb": round(max(p.maxrss_kb for p in ps) / 1024, 1),
                "exit_statuses": sorted({p.status for p in ps}),
            }
            for (node, role), ps in _group_processes(em.processes).items()
        ],
        "blocks": [
            {
                "index": b.index,
                "config": b.config,
                "fault": b.fault.describe() if b.fault else None,
                "sent": len(b.sent),
                "deliveries": b.releases.messages,
                "hold_us": round(b.hold_ns / 1e3),
                "achieved_rate": round(b.achieved_rate, 2),
                "machine_cpu_percent": round(100 * b.cpu_fraction, 1),
                "own_cpu_percent": round(100 * b.own_cpu_fraction, 1),
                "backlog_drops": b.backlog_drops,
                "startup_s": round(b.startup_s, 2),
                "wall_s": round(b.wall_s, 2),
                "controller_cpu_percent": round(
                    100 * b.controller_cpu_s / max(1e-9, b.wall_s * (os.cpu_count() or 1)), 1
                ),
            }
            for b in em.blocks
        ],
        "settings": settings_dict(s),
    }
    images: dict[str, str] = {}
    if configs:
        images.update(rp.plot_cdfs(configs))
        images["pfair"] = rp.plot_pfair(configs)
        images["pfair_curve"] = rp.plot_pfair_curve(configs, tau_ns)
        images["hold"] = rp.plot_hold(configs)
        images["lateness"] = rp.plot_lateness(configs)
    edges = [(a, b, bool(d.get("hedge"))) for a, b, d in em.plan.graph.edges(data=True)]
    images["tree"] = rp.plot_tree(em.plan.levels, edges, leaves, host_of, set(lemon_nodes), killed)
    return doc, images
