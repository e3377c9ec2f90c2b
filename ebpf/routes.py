"""Route and neighbour resolution of relay targets, and the interface that holds an address."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from ebpf.libbpf import FastPathError
from ebpf.netlink import iproute, off_event_loop

# Neighbour states whose MAC we trust enough to write into the target table.
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERM


@off_event_loop
def interface_of(addr: str) -> str:
    """Name of the interface in this netns that holds IPv4 `addr` (where a node bound to it
    receives): the `ifname` to attach to. 127.0.0.0/8 is on `lo`."""
    if ipaddress.IPv4Address(addr).is_loopback:
        return "lo"
    with iproute() as ipr:
        for a in ipr.get_addr(family=socket.AF_INET):
            if a.get_attr("IFA_ADDRESS") == addr or a.get_attr("IFA_LOCAL") == addr:
                link = ipr.get_links(a["index"])[0]
                return str(link.get_attr("IFLA_IFNAME"))
    raise FastPathError(f"no interface holds {addr} in this network namespace")


@dataclass(frozen=True)
class ResolvedTarget:
    """One relay target as written into the kernel's target table."""

    ip: str
    """Destination IPv4."""
    port: int
    """Destination UDP port."""
    hedge: bool
    """Copies carry the hedge-copy flag."""
    ifindex: int
    """Egress interface."""
    saddr: str | None
    """Source address of the copies; None = the address each packet was sent to."""
    dmac: str | None
    """Next-hop MAC from the neighbour table, or None: looked up per packet (bpf_fib_lookup)."""
    smac: str
    """Egress interface MAC."""


IFF_LOOPBACK = 0x8
IFF_NOARP = 0x80
ZERO_MAC = "00:00:00:00:00:00"


def resolve_target(
    ipr: Any, ip: str, port: int, hedge: bool, saddr: str | None = None
) -> ResolvedTarget | None:
    """Route and neighbour lookup for one target in this netns; None when it has no route."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        route = ipr.route("get", dst=ip)[0]
    except (NetlinkError, IndexError):
        return None
    oif = int(route.get_attr("RTA_OIF"))
    nexthop = route.get_attr("RTA_GATEWAY") or ip
    link = ipr.get_links(oif)[0]
    smac = link.get_attr("IFLA_ADDRESS") or ZERO_MAC
    dmac = None
    if link["flags"] & (IFF_LOOPBACK | IFF_NOARP):
        dmac = ZERO_MAC  # no link-layer addressing: any MAC does
    else:
        for neigh in ipr.get_neighbours(ifindex=oif, dst=nexthop, family=socket.AF_INET):
            if neigh["state"] & _NUD_USABLE and neigh.get_attr("NDA_LLADDR"):
                dmac = neigh.get_attr("NDA_LLADDR")
                break
    return ResolvedTarget(ip, port, hedge, oif, saddr, dmac, str(smac))
