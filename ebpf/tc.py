"""Attach and detach programs: TC (clsact ingress or egress, one priority per node) and XDP."""

from __future__ import annotations

import errno
import zlib
from collections.abc import Sequence

from ebpf.libbpf import FastPathError
from ebpf.netlink import ifindex, iproute, off_event_loop

# TC filter priorities of our filters on clsact ingress: one per node, derived from its name (and
# recorded), so several nodes can share an interface (loopback) and detaching or cleaning up after
# a crash removes exactly that node's filter and leaves anyone else's alone.
TC_PRIO_BASE = 0x4000
TC_PRIO_SPAN = 0x3000
TC_HANDLE = 1
TC_INGRESS_PARENT = 0xFFFFFFF2  # "ffff:fff2", clsact ingress
TC_EGRESS_PARENT = 0xFFFFFFF3  # "ffff:fff3", clsact egress
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


def tc_prio(role: str, node: str, attempt: int = 0) -> int:
    """The TC filter priority of a node's program (attempt > 0 after a collision)."""
    return TC_PRIO_BASE + (zlib.crc32(f"{role}/{node}".encode()) + attempt) % TC_PRIO_SPAN


def tc_attach(
    ifname: str, prog_fd: int, name: str, prios: Sequence[int], parent: int = TC_INGRESS_PARENT
) -> int:
    """Attach at clsact ingress under the first free priority of `prios`; returns it."""
    from pyroute2.netlink.exceptions import NetlinkError

    with iproute() as ipr:
        idx = ifindex(ipr, ifname)
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise FastPathError(f"add clsact on {ifname}: {e}") from e
        for prio in prios:
            try:
                ipr.tc(
                    "add-filter",
                    "bpf",
                    idx,
                    TC_HANDLE,
                    fd=prog_fd,
                    name=name,
                    parent=parent,
                    prio=prio,
                    direct_action=True,
                    protocol=0x0003,  # ETH_P_ALL; pyroute2 swaps the byte order itself
                )
                return prio
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise FastPathError(f"attach {name} to {ifname} ingress: {e}") from e
        raise FastPathError(f"no free TC priority on {ifname} for {name}")


def tc_detach(ifname: str, prio: int, parent: int = TC_INGRESS_PARENT) -> None:
    """Remove our filter of priority `prio`; a filter or interface already gone is no error."""
    from pyroute2.netlink.exceptions import NetlinkError

    with iproute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return
        idx = found[0]
        try:
            ipr.tc(
                "del-filter",
                "bpf",
                idx,
                TC_HANDLE,
                parent=parent,
                prio=prio,
                protocol=0x0003,
            )
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise FastPathError(f"detach from {ifname}: {e}") from e
        # Drop the clsact qdisc too when nothing else hangs on it.
        try:
            left = list(ipr.get_filters(idx, parent=TC_INGRESS_PARENT)) + list(
                ipr.get_filters(idx, parent=TC_EGRESS_PARENT)
            )
            if not left:
                ipr.tc("del", "clsact", idx)
        except NetlinkError:
            pass


def xdp_attach(ifname: str, prog_fd: int) -> None:
    """Attach a loaded XDP program to `ifname` in this netns."""
    with iproute() as ipr:
        idx = ifindex(ipr, ifname)
        ipr.link("set", index=idx, xdp_fd=prog_fd)


def xdp_detach(ifname: str) -> None:
    """Remove the XDP program of `ifname`, if the interface still exists."""
    with iproute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            ipr.link("set", index=found[0], xdp_fd=-1)


@off_event_loop
def attach_tc(ifname: str, prog_fd: int, name: str, *, egress: bool = False) -> int:
    """Attach any loaded TC program at clsact ingress (or egress) of `ifname` in this netns,
    under a free priority derived from `name`; returns the priority (for detach_tc)."""
    prios = [tc_prio("tc", name, i) for i in range(16)]
    return tc_attach(
        ifname, prog_fd, name, prios, TC_EGRESS_PARENT if egress else TC_INGRESS_PARENT
    )


@off_event_loop
def detach_tc(ifname: str, prio: int, *, egress: bool = False) -> None:
    """Undo attach_tc."""
    tc_detach(ifname, prio, TC_EGRESS_PARENT if egress else TC_INGRESS_PARENT)
