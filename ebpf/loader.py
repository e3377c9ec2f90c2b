"""The relay and receiver fast paths (load, pin, attach, detach) and the package's entry points."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

from ebpf.build import BuildError, build
from ebpf.libbpf import (
    PROG_INFO_RUN_TIME_AT,
    PROG_INFO_SIZE,
    SK_BUFF_CTX_SIZE,
    BpfMap,
    BpfObject,
    FastPathError,
    TestRun,
    prog_run_stats,
    prog_test_run,
    require_libbpf,
)
from ebpf.netlink import CLONE_NEWNET, in_netns, iproute, off_event_loop
from ebpf.pins import (
    BPF_FS_MAGIC,
    BPFFS,
    PIN_SUBDIR,
    STATE_DIR,
    bpffs_root,
    cleanup,
    node_of_pin,
    pin_dir,
    pin_name,
    record_owner,
    record_path,
    status,
)
from ebpf.routes import (
    IFF_LOOPBACK,
    IFF_NOARP,
    ZERO_MAC,
    ResolvedTarget,
    interface_of,
    resolve_target,
)
from ebpf.structs import (
    PARENT_KEY,
    RECEIVER_COUNTERS,
    RELAY_COUNTERS,
    TABLE_CSUM_HELPERS,
    TABLE_HEAD,
    TARGET,
    TARGET_FIB,
    TARGET_HEDGE,
)
from ebpf.tc import (
    TC_EGRESS_PARENT,
    TC_HANDLE,
    TC_INGRESS_PARENT,
    TC_PRIO_BASE,
    TC_PRIO_SPAN,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    attach_tc,
    detach_tc,
    tc_attach,
    tc_detach,
    tc_prio,
    xdp_attach,
    xdp_detach,
)

# What callers import from ebpf.loader, wherever it now lives.
__all__ = [
    "BPFFS",
    "BPF_FS_MAGIC",
    "CLONE_NEWNET",
    "IFF_LOOPBACK",
    "IFF_NOARP",
    "PARENT_KEY",
    "PIN_SUBDIR",
    "PROG_INFO_RUN_TIME_AT",
    "PROG_INFO_SIZE",
    "RECEIVER_COUNTERS",
    "RELAY_COUNTERS",
    "SK_BUFF_CTX_SIZE",
    "STATE_DIR",
    "TABLE_CSUM_HELPERS",
    "TABLE_HEAD",
    "TARGET",
    "TARGET_FIB",
    "TARGET_HEDGE",
    "TC_EGRESS_PARENT",
    "TC_HANDLE",
    "TC_INGRESS_PARENT",
    "TC_PRIO_BASE",
    "TC_PRIO_SPAN",
    "XDP_FLAGS_DRV_MODE",
    "XDP_FLAGS_SKB_MODE",
    "ZERO_MAC",
    "BpfMap",
    "BpfObject",
    "FastPathError",
    "ReceiverFastPath",
    "RelayFastPath",
    "ResolvedTarget",
    "TestRun",
    "attach_tc",
    "bpffs_root",
    "cleanup",
    "detach_tc",
    "fast_path_available",
    "interface_of",
    "node_of_pin",
    "pin_dir",
    "pin_name",
    "prog_test_run",
    "resolve_target",
    "status",
    "tc_prio",
]

log = logging.getLogger(__name__)

_available: dict[bool, tuple[bool, str]] = {}


def fast_path_available(*, verify: bool = True) -> tuple[bool, str]:
    """(usable, reason when not): root, libbpf, clang, bpffs, and with `verify` both programs
    pass the verifier.

    A daemon about to attach passes verify=False: its own load runs the verifier anyway (and
    its failure falls back the same way), and each verifier run of the relay program costs
    ~0.3 s of CPU, which a hundred relays starting at once in an emulation pay together.
    """
    if verify in _available:
        return _available[verify]
    try:
        if os.geteuid() != 0:
            raise FastPathError("needs root (CAP_BPF and CAP_NET_ADMIN)")
        require_libbpf()
        bpffs_root()
        for program in ("relay", "receiver"):
            path = build(program)
            if verify:
                BpfObject(path).close()
        _available[verify] = (True, "")
    except (FastPathError, BuildError, OSError) as e:
        _available[verify] = (False, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return _available[verify]


class _Attachment:
    """What both fast paths share: object, pins, crash record, detach."""

    role = ""
    prog_name = ""

    def __init__(self, *, node: str, ifname: str, hook: str = "tc") -> None:
        self.node = node
        self.ifname = ifname
        self.hook = hook
        self._obj: BpfObject | None = None
        self._maps: dict[str, BpfMap] = {}
        self._attached = False
        self._pins: Path | None = None
        self._recorded = False
        self._netns_fd: int | None = None
        self.tc_prio = tc_prio(self.role, node)
        """TC filter priority actually used (set by attach)."""

    def _load(self) -> None:
        """Load, record ownership, pin. The record is written before pinning, so a crash never
        leaves pins that `cleanup` cannot attribute."""
        folder = pin_dir(self.node)
        record = record_path(self.node)
        if folder.exists() or record.exists():
            cleanup(self.node)
            if folder.exists():
                raise FastPathError(f"node {self.node} is already attached by a live process")
        obj = BpfObject(build(self.role))
        self._obj = obj
        self._netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self._record()
        folder.parent.mkdir(parents=True, exist_ok=True)
        obj.pin_maps(folder)
        self._pins = folder

    def _record(self) -> None:
        record_owner(
            self.node, role=self.role, ifname=self.ifname, hook=self.hook, tc_prio=self.tc_prio
        )
        self._recorded = True

    def _map(self, name: str) -> BpfMap:
        if name not in self._maps:
            if self._obj is None:
                raise FastPathError(f"{self.role} fast path of {self.node} is not attached")
            self._maps[name] = self._obj.map(name)
        return self._maps[name]

    @property
    def prog_fd(self) -> int:
        """File descriptor of the loaded program (for BPF_PROG_TEST_RUN)."""
        if self._obj is None:
            raise FastPathError("not loaded")
        return self._obj.prog_fd(self.prog_name)

    def _hook_on(self) -> None:
        if self.hook == "xdp":
            xdp_attach(self.ifname, self.prog_fd)
        else:
            prios = [tc_prio(self.role, self.node, i) for i in range(16)]
            parent = TC_EGRESS_PARENT if self.hook == "tc-egress" else TC_INGRESS_PARENT
            self.tc_prio = tc_attach(self.ifname, self.prog_fd, self.prog_name, prios, parent)
        self._attached = True
        self._record()

    def prog_stats(self) -> tuple[int, int]:
        """(run time in ns, runs) of the attached program; counted only while the sysctl
        kernel.bpf_stats_enabled is 1 (bench/fastpath.py turns it on)."""
        return prog_run_stats(self.prog_fd)

    @off_event_loop
    def close(self) -> None:
        """Detach, unpin, remove the node's folder and record. Safe to call twice."""
        if self._attached:
            try:
                with in_netns(self._netns_fd):
                    if self.hook == "xdp":
                        xdp_detach(self.ifname)
                    else:
                        parent = TC_EGRESS_PARENT if self.hook == "tc-egress" else TC_INGRESS_PARENT
                        tc_detach(self.ifname, self.tc_prio, parent)
            finally:
                self._attached = False
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        if self._obj is not None:
            self._obj.close()
            self._obj = None
        if self._pins is not None:
            shutil.rmtree(self._pins, ignore_errors=True)
            self._pins = None
        if self._recorded:
            record_path(self.node).unlink(missing_ok=True)
            self._recorded = False

    def _counters(self, stats: str, names: Sequence[str]) -> dict[str, int]:
        m = self._map(stats)
        return {n: m.sum_u64(i) for i, n in enumerate(names)}

    def __enter__(self) -> _Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mac_bytes(mac: str | None) -> bytes:
    return bytes.fromhex(mac.replace(":", "")) if mac else bytes(6)


class RelayFastPath(_Attachment):
    """The relay's kernel replication: TC ingress on `ifname`, copies to every target.

    Copies leave from `listen_addr` when given, else from the address each packet was sent to
    (what a user-space relay's socket bound to that address sends from), and from `listen_port`.
    `csum_helpers` makes the program patch every UDP checksum with bpf_l4_csum_replace instead
    of its own arithmetic (same bytes, more helper calls; the tests run both).
    """

    role = "relay"
    prog_name = "jasper_relay"

    def __init__(
        self,
        *,
        node: str,
        ifname: str,
        listen_port: int,
        listen_addr: str | None = None,
        csum_helpers: bool = False,
    ) -> None:
        super().__init__(node=node, ifname=ifname, hook="tc")
        self.csum_helpers = csum_helpers
        """Written into the target table with the next set_targets."""
        if not 0 < listen_port < 65536:
            raise ValueError(f"listen_port {listen_port} out of range")
        self.listen_port = listen_port
        self.listen_addr = None if listen_addr in (None, "0.0.0.0") else listen_addr
        self.targets: tuple[ResolvedTarget, ...] = ()
        """The node's table last written (copies of streams without their own), with how each
        MAC was found."""
        self.stream_targets: dict[int, tuple[ResolvedTarget, ...]] = {}
        """Stream id -> its own table, for a relay node in several trees."""
        self.unroutable: tuple[tuple[str, int, bool], ...] = ()
        """Targets left out because this namespace has no route to them."""

    @property
    def max_targets(self) -> int:
        return int(self._map("relay_targets").value_size - TABLE_HEAD.size) // TARGET.size

    @off_event_loop
    def attach(self) -> None:
        """Load, pin under /sys/fs/bpf/jasper/<node>/, set an empty table, attach at ingress."""
        try:
            self._load()
            self._write_table([])
            self._hook_on()
        except BaseException:
            self.close()
            raise
        log.info("relay fast path of %s attached on %s", self.node, self.ifname)

    def _write_table(self, targets: Sequence[ResolvedTarget], stream: int | None = None) -> None:
        m = self._map("relay_targets" if stream is None else "relay_streams")
        if len(targets) > self.max_targets:
            raise ValueError(f"{len(targets)} targets; the program holds {self.max_targets}")
        table_flags = TABLE_CSUM_HELPERS if self.csum_helpers else 0
        body = TABLE_HEAD.pack(struct.pack("!H", self.listen_port), len(targets), table_flags)
        for t in targets:
            flags = (TARGET_HEDGE if t.hedge else 0) | (0 if t.dmac else TARGET_FIB)
            body += TARGET.pack(
                t.ifindex,
                ipaddress.IPv4Address(t.ip).packed,
                ipaddress.IPv4Address(t.saddr or "0.0.0.0").packed,
                struct.pack("!H", t.port),
                struct.pack("!H", self.listen_port),
                _mac_bytes(t.dmac),
                _mac_bytes(t.smac),
                flags,
            )
        # One element holds the whole table: the kernel swaps it in one step.
        m.update(
            struct.pack("=I", 0 if stream is None else stream), body.ljust(m.value_size, b"\0")
        )
        if stream is None:
            self.targets = tuple(targets)
        else:
            self.stream_targets = {**self.stream_targets, stream: tuple(targets)}

    @off_event_loop
    def set_targets(
        self, targets: Sequence[tuple[str, int, bool]], *, stream: int | None = None
    ) -> None:
        """Replace the copy targets: (IPv4, UDP port, is_hedge) each, resolved here and now.

        stream: the table of that stream only (a relay node in several trees); None: the
        node's table, which copies of every stream without a table of its own follow.
        A target whose next-hop MAC is not in the neighbour table is resolved per packet with
        bpf_fib_lookup (counted as fib_fallback, or no_neighbour when that fails too).
        """
        if stream is not None and not 0 <= stream < 2**32:
            raise ValueError(f"stream {stream} out of range")
        resolved: list[ResolvedTarget] = []
        unroutable: list[tuple[str, int, bool]] = []
        with in_netns(self._netns_fd), iproute() as ipr:
            for ip, port, hedge in targets:
                r = resolve_target(ipr, ip, int(port), bool(hedge), self.listen_addr)
                if r is None:
                    unroutable.append((ip, port, hedge))
                else:
                    resolved.append(r)
        if unroutable:
            log.warning("relay %s: no route to targets %s", self.node, unroutable)
        self.unroutable = tuple(unroutable)
        self._write_table(resolved, stream)

    @off_event_loop
    def remove_stream(self, stream: int) -> None:
        """Drop `stream`'s own table: its copies follow the node's table from now on."""
        if stream in self.stream_targets:
            self._map("relay_streams").delete(struct.pack("=I", stream))
            self.stream_targets = {s: t for s, t in self.stream_targets.items() if s != stream}

    def counters(self) -> dict[str, int]:
        """Kernel counters summed over CPUs, plus how the current targets were resolved."""
        c = self._counters("relay_stats", RELAY_COUNTERS)
        every = [t for table in (self.targets, *self.stream_targets.values()) for t in table]
        c["targets"] = len(every)
        c["targets_fib"] = sum(1 for t in every if t.dmac is None)
        c["stream_tables"] = len(self.stream_targets)
        c["targets_unroutable"] = len(self.unroutable)
        return c

    def reset(self) -> None:
        """Forget every message seen and zero the counters (between test fixtures)."""
        self._map("relay_ring").zero_array()
        self._map("relay_stats").zero_array()


class ReceiverFastPath(_Attachment):
    """The receiver host's filter: duplicate copies and non-parents dropped before user space."""

    role = "receiver"

    def __init__(self, *, node: str, ifname: str, ports: Sequence[int], hook: str = "tc") -> None:
        # "tc-egress" filters what leaves `ifname`: bench/fastpath.py uses it as a counting sink
        # at a relay's wire (no parents allowed: every copy is counted and dropped there).
        if hook not in ("tc", "xdp", "tc-egress"):
            raise ValueError(f"hook must be tc, xdp or tc-egress, not {hook!r}")
        super().__init__(node=node, ifname=ifname, hook=hook)
        self.prog_name = "jasper_receiver_xdp" if hook == "xdp" else "jasper_receiver_tc"
        self.ports = tuple(int(p) for p in ports)
        for p in self.ports:
            if not 0 < p < 65536:
                raise ValueError(f"port {p} out of range")

    @off_event_loop
    def attach(self) -> None:
        try:
            self._load()
            m = self._map("recv_ports")
            for p in self.ports:
                m.update(struct.pack("!H", p), b"\1")
            self._hook_on()
        except BaseException:
            self.close()
            raise
        log.info("receiver fast path of %s attached on %s (%s)", self.node, self.ifname, self.hook)

    def set_ports(self, ports: Sequence[int]) -> None:
        """The endpoint ports filtered (a plan that adds endpoints adds theirs); new ones go in
        before stale ones leave. A port not listed passes to user space unfiltered."""
        wanted = tuple(dict.fromkeys(int(p) for p in ports))
        for p in wanted:
            if not 0 < p < 65536:
                raise ValueError(f"port {p} out of range")
        m = self._map("recv_ports")
        for p in wanted:
            m.update(struct.pack("!H", p), b"\1")
        keep = {struct.pack("!H", p) for p in wanted}
        for key in list(m.keys()):
            if key not in keep:
                m.delete(key)
        self.ports = wanted

    def set_parents(self, parents: Sequence[tuple[str, int]]) -> None:
        """Allow-list of (source IPv4, source port or 0 for any). New entries go in before stale
        ones leave, so a parent present in both lists is never refused in between."""
        m = self._map("recv_parents")
        wanted = {
            PARENT_KEY.pack(ipaddress.IPv4Address(ip).packed, struct.pack("!H", int(port)))
            for ip, port in parents
        }
        if len(wanted) > m.max_entries:
            raise ValueError(f"{len(wanted)} parents; the map holds {m.max_entries}")
        for key in wanted:
            m.update(key, b"\1")
        for key in list(m.keys()):
            if key not in wanted:
                m.delete(key)

    def counters(self) -> dict[str, int]:
        return self._counters("recv_stats", RECEIVER_COUNTERS)

    def reset(self) -> None:
        """Forget every message seen and zero the counters (between test fixtures)."""
        self._map("recv_ring").zero_array()
        self._map("recv_stats").zero_array()
