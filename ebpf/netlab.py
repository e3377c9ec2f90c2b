"""Network namespaces joined by veth for fast-path tests and benchmarks (publisher, relay, MPs)."""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def sh(*args: str, ns: str | None = None, check: bool = True) -> str:
    """Run one command (in `ns` when given); returns stdout."""
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res.stdout


@contextmanager
def entered(ns: str) -> Iterator[None]:
    """Move this thread into network namespace `ns` and back. Sockets and netlink handles made
    inside stay bound to `ns` after leaving."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        yield
    finally:
        _libc.setns(home, CLONE_NEWNET)
        os.close(target)
        os.close(home)


def mac(group: int, index: int) -> str:
    """Locally administered MAC, fixed per interface so neighbour entries can be static."""
    return f"02:4a:53:00:{group:02x}:{index:02x}"


@dataclass
class Endpoint:
    """A market participant's host in the lab."""

    ns: str
    """Its network namespace."""
    ifname: str
    """Its interface toward the hub."""
    ip: str
    """Its IPv4 address."""


@dataclass
class FanoutLab:
    """pub ns --veth-- relay ns --veth-- hub ns (bridge) --veth-- N receiver namespaces.

    The relay sees publisher traffic on `relay_in` and sends copies out of `relay_out`. Static
    neighbour entries everywhere (the relay's entries are what the fast path's loader reads), and
    TX checksum offload off at the publisher so its packets carry full checksums.
    """

    receivers: int = 3
    """Number of receiver namespaces."""
    prefix: str = field(default_factory=lambda: f"jt-ebpf-{os.getpid()}")
    """Namespace name prefix, unique per process."""
    pub_ip: str = "10.77.1.1"
    relay_in_ip: str = "10.77.1.2"
    relay_out_ip: str = "10.77.2.1"
    relay_in: str = "rin"
    relay_out: str = "rout"
    pub_if: str = "pub0"
    namespaces: list[str] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)

    @property
    def pub(self) -> str:
        return f"{self.prefix}-pub"

    @property
    def relay(self) -> str:
        return f"{self.prefix}-relay"

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)

    def up(self) -> FanoutLab:
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        for ns in (self.pub, self.relay, self.hub):
            self._add_ns(ns)
        sh("ip", "-n", self.pub, "link", "add", self.pub_if, "address", mac(1, 1), "type", "veth",
           "peer", "name", self.relay_in, "netns", self.relay, "address", mac(1, 2))  # fmt: skip
        sh("ip", "-n", self.relay, "link", "add", self.relay_out, "address", mac(2, 1), "type",
           "veth", "peer", "name", "h0", "netns", self.hub)  # fmt: skip
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "h0", "master", "br0", "up")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        sh("ip", "-n", self.pub, "addr", "add", f"{self.pub_ip}/24", "dev", self.pub_if)
        sh("ip", "-n", self.pub, "link", "set", self.pub_if, "up")
        sh("ip", "-n", self.relay, "addr", "add", f"{self.relay_in_ip}/24", "dev", self.relay_in)
        sh("ip", "-n", self.relay, "addr", "add", f"{self.relay_out_ip}/24", "dev", self.relay_out)
        sh("ip", "-n", self.relay, "link", "set", self.relay_in, "up")
        sh("ip", "-n", self.relay, "link", "set", self.relay_out, "up")
        sh("ip", "-n", self.pub, "neigh", "replace", self.relay_in_ip, "lladdr", mac(1, 2),
           "dev", self.pub_if, "nud", "permanent")  # fmt: skip
        sh("ip", "-n", self.relay, "neigh", "replace", self.pub_ip, "lladdr", mac(1, 1),
           "dev", self.relay_in, "nud", "permanent")  # fmt: skip
        # The publisher computes full checksums itself, as a real NIC would then check them.
        sh("ethtool", "-K", self.pub_if, "tx", "off", ns=self.pub)
        for i in range(self.receivers):
            ns = f"{self.prefix}-r{i}"
            self._add_ns(ns)
            ip = f"10.77.2.{10 + i}"
            sh("ip", "-n", ns, "link", "add", "mp0", "address", mac(3, i), "type", "veth",
               "peer", "name", f"h{i + 1}", "netns", self.hub)  # fmt: skip
            sh("ip", "-n", self.hub, "link", "set", f"h{i + 1}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "mp0")
            sh("ip", "-n", ns, "link", "set", "mp0", "up")
            sh("ip", "-n", ns, "neigh", "replace", self.relay_out_ip, "lladdr", mac(2, 1),
               "dev", "mp0", "nud", "permanent")  # fmt: skip
            sh("ip", "-n", self.relay, "neigh", "replace", ip, "lladdr", mac(3, i),
               "dev", self.relay_out, "nud", "permanent")  # fmt: skip
            self.endpoints.append(Endpoint(ns=ns, ifname="mp0", ip=ip))

    def down(self) -> None:
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        self.endpoints.clear()

    def __enter__(self) -> FanoutLab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()
