"""Relay daemon: forwards the first copy of each message to its children and hedge targets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from jasper.relay_core import Forward, RelayCore, RelayCoreCounters
from jasper.topology import RelayConfig, Topology, TopologyError, parse_topology
from overlay.common import hop_model_of, link_model_of, process_figures
from overlay.delayline import DelayLine, SenderNames
from overlay.kernel import drain, open_udp

log = logging.getLogger(__name__)


@dataclass
class RelayCounters:
    """What one relay node's sockets did (its core counts what it decided)."""

    received: int = 0
    """Datagrams received on the node's socket (before the link model)."""
    kernel_drops: int = 0
    """Datagrams the kernel dropped for a full receive buffer (SO_RXQ_OVFL)."""
    sent: int = 0
    """Copies sent to own children."""
    sent_hedge: int = 0
    """Copies sent as hedges to siblings' children."""
    send_errors: Counter[str] = field(default_factory=Counter)
    """Sends refused by the kernel, by errno name (a full buffer counts as ENOBUFS/EAGAIN)."""

    def to_dict(self, core: RelayCoreCounters) -> dict[str, Any]:
        """The node's status: the core's decisions and the sockets' counts, in one dict."""
        out: dict[str, Any] = {}
        for part in (core, self):
            for f in fields(part):
                value = getattr(part, f.name)
                out[f.name] = dict(value) if isinstance(value, Counter) else value
        out["malformed_total"] = sum(core.malformed.values())
        return out


_Table = tuple[list[tuple[str, int]], list[tuple[str, int]]]
"""(own children, hedge targets) as socket addresses."""


class RelayNode:
    """One relay of the tree: its socket, forwarding tables, dedup rings and counters.

    A relay may serve several streams (trees): each stream has its own tables and dedup ring,
    and a copy follows the tables of the stream and plan epoch it carries.
    """

    def __init__(self, config: RelayConfig, topo: Topology, *, ring_size: int = 4096) -> None:
        self.name = config.name
        self.config = config
        self.sock = open_udp(config.addr, config.port)
        self.counters = RelayCounters()
        self.core = RelayCore(ring_size=ring_size)
        """Admission and flagging (jasper/relay_core.py); the rest here is sockets."""
        self.forward_user_space = True
        """False when a kernel fast path replicates for this node."""
        self.handle: Callable[[bytes, tuple[str, int], int], None] = self.process_raw
        """What the event loop calls per datagram (the relay process puts its link model here)."""
        self.newest: dict[int, int] = {}
        """Stream id -> plan epoch of the newest plan of that stream this node is in."""
        self.tables: dict[int, dict[int, _Table]] = {}
        """Stream id -> plan epoch -> (own, hedges): during a make-before-break switch, the old
        plan's table too, so messages stamped with the old epoch still take the old tree."""
        self.set_targets(config, topo)

    def set_targets(
        self,
        config: RelayConfig,
        topo: Topology,
        *,
        previous: tuple[RelayConfig, Topology] | None = None,
    ) -> None:
        """Forward `topo`'s stream by `config` from now on; with `previous` (the old plan's
        config for this node), messages of the old epoch keep following the old plan. Other
        streams keep their tables and dedup state."""
        tables = {topo.plan_epoch: _table(config, topo)}
        if previous is not None and previous[1].plan_epoch != topo.plan_epoch:
            tables[previous[1].plan_epoch] = _table(*previous)
        stream = topo.stream.id
        # Replace in one assignment: a send loop in progress keeps the old tables.
        self.tables = {**self.tables, stream: tables}
        self.newest = {**self.newest, stream: topo.plan_epoch}
        self.config = config
        auth = topo.stream.auth
        self.core.set_stream(
            stream,
            keys=auth.by_epoch() if auth is not None else None,
            session=topo.stream.session,
        )

    def drop_stream(self, stream: int) -> None:
        """Stop serving `stream`: its copies are refused and its tables and dedup state go."""
        self.core.drop_stream(stream)
        self.tables = {s: t for s, t in self.tables.items() if s != stream}
        self.newest = {s: e for s, e in self.newest.items() if s != stream}

    def table(self, stream: int, epoch: int | None = None) -> _Table:
        """(own, hedges) for a copy of `stream` stamped with plan `epoch`; an epoch this node
        has no table for (or None) takes the stream's newest plan."""
        tables = self.tables.get(stream)
        if not tables:
            return [], []
        found = tables.get(epoch) if epoch is not None else None
        return found if found is not None else tables[self.newest[stream]]

    def process_raw(self, data: bytes, src: tuple[str, int], rx_ns: int) -> None:
        self.process(data, f"{src[0]}:{src[1]}", rx_ns)

    def process(self, data: bytes, sender: str, _arrival_ns: int) -> None:
        """Handle one copy at its (effective) arrival time."""
        fwd = self.core.datagram_received(data, sender)
        if fwd is not None and self.forward_user_space:
            self.forward(fwd)

    def forward(self, fwd: Forward) -> None:
        """Send to the children (and hedge targets) of the stream and plan the message
        carries."""
        c = self.counters
        sendto = self.sock.sendto
        own_targets, hedge_targets = self.table(fwd.stream_id, fwd.plan_epoch)
        own, hedge = fwd.own, fwd.hedge
        for addr in own_targets:
            try:
                sendto(own, addr)
                c.sent += 1
            except OSError as exc:
                c.send_errors[_errno_name(exc)] += 1
        for addr in hedge_targets:
            try:
                sendto(hedge, addr)
                c.sent_hedge += 1
            except OSError as exc:
                c.send_errors[_errno_name(exc)] += 1

    def close(self) -> None:
        self.sock.close()


def _table(config: RelayConfig, topo: Topology) -> _Table:
    addrs = topo.addresses()
    own = [addrs[t.node] for t in config.targets if not t.hedge]
    hedges = [addrs[t.node] for t in config.targets if t.hedge]
    return own, hedges


def _previous_plan(topo: Topology) -> Topology | None:
    """The plan a make-before-break switch moves away from ("x-previous"), if any."""
    doc = topo.extra.get("x-previous")
    if not isinstance(doc, dict):
        return None
    try:
        return parse_topology(doc)
    except TopologyError as exc:
        log.warning("ignoring x-previous of plan %d: %s", topo.plan_epoch, exc)
        return None


def _model_at(topo: Topology) -> str | None:
    """Where the plan's link model is applied ("hops", "receivers"), None when off."""
    try:
        model = link_model_of(topo)
    except TopologyError:
        return None
    return None if model is None else model.emulated_at


def _errno_name(exc: OSError) -> str:
    import errno

    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


class Relay:
    """A relay process: hosts one or more relay nodes of a topology on one event loop."""

    def __init__(
        self,
        topo: Topology,
        names: Sequence[str],
        *,
        link_model: bool = True,
        clock: Callable[[], int] = time.time_ns,
        ring_size: int = 4096,
    ) -> None:
        if not names:
            raise ValueError("a relay process needs at least one relay name")
        self.topo = topo
        """The plan applied last (of any stream): its link model is the process's."""
        self.plans: dict[int, Topology] = {topo.stream.id: topo}
        """Stream id -> the plan this process runs for it (a relay may serve several trees)."""
        self.clock = clock
        self.started_ns = time.time_ns()
        self._use_link_model = link_model
        self.delay = DelayLine(hop_model_of(topo) if link_model else None, clock=clock)
        self.senders = SenderNames(topo)
        self.nodes: dict[str, RelayNode] = {}
        try:
            for name in names:
                node = RelayNode(topo.relay(name), topo, ring_size=ring_size)
                self.nodes[name] = node
                node.handle = self._handler(node)
        except BaseException:
            self.close()
            raise
        self.fast_path: dict[str, Any] = {}
        self.fast_path_mode = "user"
        self.fast_path_off: dict[str, str] = {}
        """Nodes whose kernel fast path was taken down while the process runs, and why."""
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Register the sockets with the running event loop."""
        loop = loop or asyncio.get_running_loop()
        self._loop = loop
        self.delay.start(loop)
        for node in self.nodes.values():
            loop.add_reader(node.sock.fileno(), self._on_readable, node)

    def close(self) -> None:
        for node in self.nodes.values():
            if self._loop is not None:
                self._loop.remove_reader(node.sock.fileno())
            node.close()
        self.delay.close()
        for fp in self.fast_path.values():
            try:
                fp.close()
            except Exception:
                log.exception("closing fast path")
        self.fast_path.clear()

    def _on_readable(self, node: RelayNode) -> None:
        got, drops = drain(node.sock, node.handle)
        node.counters.received += got
        if drops >= 0:
            node.counters.kernel_drops = drops

    def _handler(self, node: RelayNode) -> Callable[[bytes, tuple[str, int], int], None]:
        admit = self.delay.admit
        name = node.name
        process = node.process

        def handle(data: bytes, src: tuple[str, int], rx_ns: int) -> None:
            admit(name, self.senders(src), data, rx_ns, process)

        return handle

    # -- control ------------------------------------------------------------------------------

    def enable_fast_path(self, mode: str, *, ifname: str | None = None) -> str:
        """Try the eBPF replication path per `mode` (auto, ebpf, user); returns the mode used.

        ifname: where to attach; None: the interface holding each node's address (lo on
        loopback, eth0 in an emulated host's namespace)."""
        if mode == "user":
            self.fast_path_mode = "user"
            return "user"
        reason = ""
        if self.delay.model is not None:
            reason = "the link model runs in user space"
        else:
            try:
                from ebpf import loader

                ok, why = loader.fast_path_available(verify=False)
                if not ok:
                    reason = str(why)
                else:
                    for node in self.nodes.values():
                        fp = loader.RelayFastPath(
                            node=node.name,
                            ifname=ifname or loader.interface_of(node.config.addr),
                            listen_port=node.config.port,
                        )
                        fp.attach()
                        self.fast_path[node.name] = fp
                        # A table per stream; the node's own table stays empty, so copies of
                        # a stream it does not serve are dropped (no_targets).
                        for stream in node.tables:
                            fp.set_targets(_target_rows(node, stream), stream=stream)
                        node.forward_user_space = False
            except Exception as exc:  # ImportError, or the loader failing to attach
                reason = f"{type(exc).__name__}: {exc}"
                for name, fp in list(self.fast_path.items()):
                    try:
                        fp.close()
                    except Exception:
                        log.exception("closing fast path of %s", name)
                    self.nodes[name].forward_user_space = True
                self.fast_path.clear()
        if reason:
            if mode == "ebpf":
                raise RuntimeError(f"eBPF fast path unavailable: {reason}")
            log.warning("eBPF fast path unavailable (%s); relaying in user space", reason)
            self.fast_path_mode = "user"
            return "user"
        self.fast_path_mode = "ebpf"
        return "ebpf"

    def apply_topology(self, topo: Topology) -> None:
        """Take a (new) plan of `topo`'s stream: swap that stream's forwarding tables (and the
        link model) in place; held copies are not dropped, other streams are not touched.

        During a make-before-break switch the plan carries the old one as "x-previous":
        messages stamped with the old epoch keep following the old plan until the publisher
        moves (the controller then sends the new plan alone, and the old table goes).

        Relays named in this process but absent from the new plan keep their sockets and
        last table of the stream until the process is told to stop or the stream is removed
        (make-before-break is the caller's plan).
        """
        stream = topo.stream.id
        self.topo = topo
        self.plans = {**self.plans, stream: topo}
        self.senders = SenderNames(*self.plans.values())
        if self._use_link_model:
            self.delay.set_model(hop_model_of(topo))
        previous = _previous_plan(topo)
        for node in self.nodes.values():
            try:
                cfg = topo.relay(node.name)
            except KeyError:
                continue
            old: tuple[RelayConfig, Topology] | None = None
            if previous is not None:
                try:
                    old = (previous.relay(node.name), previous)
                except KeyError:
                    old = None
            node.set_targets(cfg, topo, previous=old)
            fp = self.fast_path.get(node.name)
            if fp is not None:
                try:
                    fp.set_targets(_target_rows(node, stream), stream=stream)
                except OSError as exc:  # the kernel's stream table is full (JASPER_MAX_STREAMS)
                    self._fast_path_down(node, f"stream {stream}'s table refused: {exc}")

    def remove_stream(self, stream: int) -> None:
        """Stop serving `stream` (no plan names it any more): its copies are refused, its
        tables and dedup state go; the other streams keep theirs, and every socket stays."""
        if stream not in self.plans:
            return
        self.plans = {s: t for s, t in self.plans.items() if s != stream}
        for node in self.nodes.values():
            node.drop_stream(stream)
            fp = self.fast_path.get(node.name)
            if fp is not None:
                fp.remove_stream(stream)  # its copies meet the node's empty table: dropped
        if self.plans:
            self.senders = SenderNames(*self.plans.values())
        log.info(
            "relay process %s no longer serves stream %d (still %s)",
            ",".join(self.nodes),
            stream,
            sorted(self.plans) or "none",
        )

    def _fast_path_down(self, node: RelayNode, why: str) -> None:
        """Forward `node` in user space from now on, every stream (the kernel could not take
        one of its tables)."""
        fp = self.fast_path.pop(node.name, None)
        if fp is not None:
            try:
                fp.close()
            except Exception:
                log.exception("closing fast path of %s", node.name)
        node.forward_user_space = True
        self.fast_path_off[node.name] = why
        if not self.fast_path:
            self.fast_path_mode = "user"
        log.warning("relay %s: eBPF fast path off, relaying in user space (%s)", node.name, why)

    def status(self) -> dict[str, Any]:
        nodes = {name: n.counters.to_dict(n.core.counters) for name, n in self.nodes.items()}
        for name, n in self.nodes.items():
            nodes[name]["streams"] = {str(s): e for s, e in sorted(n.newest.items())}
        for name, fp in self.fast_path.items():
            try:
                nodes[name]["fast_path"] = fp.counters()
            except Exception as exc:
                nodes[name]["fast_path"] = {"error": str(exc)}
        for name, why in self.fast_path_off.items():
            nodes[name]["fast_path_off"] = why
        return {
            "kind": "relay",
            "nodes": nodes,
            "plan_epoch": self.topo.plan_epoch,
            "streams": {str(s): t.plan_epoch for s, t in sorted(self.plans.items())},
            "fast_path": self.fast_path_mode,
            "fast_path_off": len(self.fast_path_off),
            "link_model": self.delay.model is not None,
            "link_model_at": _model_at(self.topo) if self._use_link_model else None,
            "delay_line": vars(self.delay.counters).copy(),
            "process": process_figures(self.started_ns),
        }

    def flush(self) -> None:
        """At shutdown: take what the kernel queued, then process what the link model holds."""
        for node in self.nodes.values():
            while True:
                got, _ = drain(node.sock, node.handle)
                node.counters.received += got
                if not got:
                    break
        self.delay.flush()


def _target_rows(node: RelayNode, stream: int) -> list[tuple[str, int, bool]]:
    """The kernel table of one stream of `node`: its newest plan's targets."""
    own, hedges = node.table(stream)
    return [(a, p, False) for a, p in own] + [(a, p, True) for a, p in hedges]
