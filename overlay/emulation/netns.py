"""Emulated VMs as network namespaces, each joined by a veth pair to one bridge in a hub namespace.

Everything this module creates lives inside namespaces whose names start with PREFIX ("jemu-"):
the bridge and the hub-side veth ends in the hub namespace, the host-side ends in each host's
namespace. Nothing is added to the caller's own namespace, so deleting the namespaces removes
every link, and no address or route ever reaches the real network (the only route in a host
namespace is the connected private /16).
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "jemu-"
"""Every namespace of an emulation starts with this; `cleanup()` removes exactly these."""

DEFAULT_SUBNET = "10.213.0.0/16"
"""Private range used inside the namespaces only."""

MANIFEST_DIR = Path("/run/jasper-emulate")
"""One JSON file per live run (tag): namespaces, pids, bpffs node folders; read by cleanup()."""

BPFFS_ROOT = Path("/sys/fs/bpf/jasper")

HOST_IFNAME = "eth0"
BRIDGE = "br0"
_CLONE_NEWNET = 0x40000000


class NetnsError(RuntimeError):
    """A namespace or link operation failed; the message carries the failing `ip` command."""


@dataclass(frozen=True)
class Host:
    """One emulated VM: a namespace with one interface on the shared bridge."""

    name: str
    """Role name in the emulation, e.g. "r1.3", "h7", "pub", "ctl"."""
    netns: str
    """Namespace name, "jemu-<tag>-<name>"."""
    addr: str
    """IPv4 address of HOST_IFNAME inside the namespace."""
    mac: str
    """MAC address of HOST_IFNAME (fixed, so neighbour entries are written without asking)."""
    index: int
    """Position in the network (1-based); names the hub-side veth "v<index>"."""


def _run_ip(args: Sequence[str], batch: Iterable[str] | None = None) -> None:
    text = None if batch is None else "\n".join(batch) + "\n"
    cmd = ["ip", *args] + (["-batch", "-"] if batch is not None else [])
    proc = subprocess.run(cmd, input=text, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of the existing namespaces that start with `prefix`."""
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


def namespace_pids(netns: str) -> list[int]:
    proc = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    )
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def enter(netns: str) -> None:
    """Move the calling thread (in a fresh child: the process) into namespace `netns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class EmulatedNetwork:
    """A set of namespaces on one bridge. Plan hosts with `add_host`, then `build()`."""

    tag: str
    """Short run id; namespaces are named "jemu-<tag>-<host>"."""
    subnet: str = DEFAULT_SUBNET
    hosts: dict[str, Host] = field(default_factory=dict)
    built: bool = False

    @property
    def hub(self) -> str:
        return f"{PREFIX}{self.tag}-hub"

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.tag}-"

    def add_host(self, name: str) -> Host:
        """Reserve a namespace, address and MAC for host `name` (idempotent)."""
        if name in self.hosts:
            return self.hosts[name]
        if self.built:
            raise NetnsError("add_host after build(): plan every host first")
        index = len(self.hosts) + 1
        net = ipaddress.IPv4Network(self.subnet)
        # Skip .0 and .255 of every /24 so no address looks like a network or broadcast one.
        offset = (index // 254) * 256 + index % 254 + 1
        if offset >= net.num_addresses - 1:
            raise NetnsError(f"subnet {self.subnet} is full at {index} hosts")
        addr = str(net.network_address + offset)
        mac = "02:4a:" + ":".join(f"{(index >> s) & 255:02x}" for s in (24, 16, 8, 0))
        host = Host(name=name, netns=f"{self.prefix}{name}", addr=addr, mac=mac, index=index)
        self.hosts[name] = host
        return host

    def build(self) -> None:
        """Create the hub, the bridge, every host namespace, veth pair, address and neighbour."""
        if self.built:
            return
        self.built = True  # set first: a failure half-way must still be torn down
        prefix_len = ipaddress.IPv4Network(self.subnet).prefixlen
        hosts = list(self.hosts.values())
        _run_ip([], [f"netns add {self.hub}"] + [f"netns add {h.netns}" for h in hosts])
        hub_cmds = [
            "link set lo up",
            f"link add {BRIDGE} type bridge",
            f"link set {BRIDGE} addrgenmode none",
            f"link set {BRIDGE} up",
        ]
        for h in hosts:
            hub_cmds += [
                f"link add v{h.index} type veth peer name {HOST_IFNAME} "
                f"address {h.mac} netns {h.netns}",
                f"link set v{h.index} addrgenmode none",
                f"link set v{h.index} master {BRIDGE} up",
            ]
        _run_ip(["-n", self.hub], hub_cmds)
        # Static forwarding entries: the bridge never floods a frame to every port.
        fdb = [f"fdb add {h.mac} dev v{h.index} master static" for h in hosts]
        proc = subprocess.run(
            ["bridge", "-n", self.hub, "-batch", "-"],
            input="\n".join(fdb) + "\n",
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise NetnsError(f"bridge fdb failed: {proc.stderr.strip()}")
        # Static neighbours (the neighbour table holds gc_thresh3 = 1024 entries by default, and
        # ARP for hundreds of peers would add its own delay to the first messages).
        neigh = [
            f"neigh replace {h.addr} lladdr {h.mac} dev {HOST_IFNAME} nud permanent" for h in hosts
        ]
        for h in hosts:
            _run_ip(
                ["-n", h.netns],
                [
                    "link set lo up",
                    # No IPv6 link-local address: no router solicitations or MLD on the bridge.
                    f"link set {HOST_IFNAME} addrgenmode none",
                    f"addr add {h.addr}/{prefix_len} dev {HOST_IFNAME}",
                    f"link set {HOST_IFNAME} up",
                ]
                + [n for n in neigh if not n.startswith(f"neigh replace {h.addr} ")],
            )

    def teardown(self) -> CleanupReport:
        """Kill every process in this network's namespaces and delete the namespaces."""
        report = cleanup(prefix=self.prefix)
        self.built = False
        return report


@dataclass(frozen=True)
class CleanupReport:
    """What `cleanup()` removed."""

    namespaces: tuple[str, ...]
    """Namespaces deleted."""
    killed: tuple[int, ...]
    """Processes that were still running inside them (sent SIGKILL)."""
    bpf_nodes: tuple[str, ...]
    """bpffs node folders removed (from run manifests)."""


BACKLOG_SYSCTL = Path("/proc/sys/net/core/netdev_max_backlog")
EMULATION_BACKLOG = 50_000
"""The per-CPU backlog an emulation runs with. Every veth hop enters it (netif_rx), and one
datagram's tree makes ~3,300 copies at N=1000, cloned in one softirq burst by the eBPF relays:
the kernel's default 1,000 dropped two of every three copies there (/proc/net/softnet_stat)."""


def raise_backlog(packets: int = EMULATION_BACKLOG) -> int | None:
    """Raise net.core.netdev_max_backlog (machine-wide) to at least `packets`; returns the value
    to restore, or None when it was already that high."""
    old = int(BACKLOG_SYSCTL.read_text())
    if old >= packets:
        return None
    BACKLOG_SYSCTL.write_text(f"{packets}\n")
    return old


def restore_backlog(old: int | None) -> None:
    """Undo raise_backlog."""
    if old is not None:
        BACKLOG_SYSCTL.write_text(f"{old}\n")


def backlog_drops() -> int:
    """Packets the kernel dropped at a full per-CPU backlog since boot (all CPUs; the second
    column of /proc/net/softnet_stat): copies lost on this machine, not by the link model."""
    total = 0
    with open("/proc/net/softnet_stat") as f:
        for line in f:
            total += int(line.split()[1], 16)
    return total


def write_manifest(tag: str, doc: dict[str, object]) -> Path:
    """Record what a live run owns, so `cleanup()` can remove it after a crash."""
    MANIFEST_DIR.mkdir(parents=True, exist_ok=True)
    path = MANIFEST_DIR / f"{tag}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)
    return path


def _manifests(prefix: str) -> list[tuple[Path, dict[str, Any]]]:
    out: list[tuple[Path, dict[str, Any]]] = []
    if not MANIFEST_DIR.is_dir():
        return out
    for path in sorted(MANIFEST_DIR.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if f"{PREFIX}{doc.get('tag', '')}-".startswith(prefix):
            out.append((path, doc))
    return out


def _kill_pid(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGCONT)  # a SIGSTOPped process would otherwise linger
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def cleanup(prefix: str = PREFIX) -> CleanupReport:
    """Remove every namespace starting with `prefix`, every process in them, and the processes
    and pinned BPF folders that the manifests of matching runs recorded."""
    if not prefix.startswith(PREFIX):
        raise ValueError(f"cleanup prefix must start with {PREFIX!r}")
    killed: list[int] = []
    bpf_nodes: list[str] = []
    manifests = _manifests(prefix)
    for _, doc in manifests:
        for pid in doc.get("pids", []) or []:
            if isinstance(pid, int) and pid > 1 and _kill_pid(pid):
                killed.append(pid)
    names = list_namespaces(prefix)
    for ns in names:
        for pid in namespace_pids(ns):
            if _kill_pid(pid):
                killed.append(pid)
    if killed:
        time.sleep(0.05)
    if names:
        # `ip -force -batch` keeps going past a namespace that vanished meanwhile.
        subprocess.run(
            ["ip", "-force", "-batch", "-"],
            input="".join(f"netns del {ns}\n" for ns in names),
            capture_output=True,
            text=True,
            check=False,
        )
    for path, doc in manifests:
        for node in doc.get("bpf_nodes", []) or []:
            if _remove_bpf_node(str(node)):
                bpf_nodes.append(str(node))
        path.unlink(missing_ok=True)
    return CleanupReport(
        namespaces=tuple(names), killed=tuple(sorted(set(killed))), bpf_nodes=tuple(bpf_nodes)
    )


def _remove_bpf_node(node: str) -> bool:
    folder = BPFFS_ROOT / node
    try:
        if "/" in node or node in ("", ".", "..") or not folder.exists():
            return False
    except OSError:  # bpffs answers EPERM for a name it does not hold
        return False
    try:
        from ebpf.loader import cleanup as ebpf_cleanup  # type: ignore[import-not-found,unused-ignore]

        ebpf_cleanup(node)
    except Exception:  # the loader may be missing; pinned files are plain unlinks
        for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        folder.rmdir()
    return not folder.exists()
