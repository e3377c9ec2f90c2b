"""bpffs discovery, the per-node pin folders, crash-state records and cleanup after a crash."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ebpf.libbpf import BpfMap, FastPathError
from ebpf.netlink import netns_inode
from ebpf.structs import RECEIVER_COUNTERS, RELAY_COUNTERS

log = logging.getLogger(__name__)

BPFFS = Path("/sys/fs/bpf")
BPF_FS_MAGIC = 0xCAFE4A11
PIN_SUBDIR = "jasper"
STATE_DIR = Path(os.environ.get("JASPER_EBPF_STATE_DIR", "/run/jasper/ebpf"))
"""Where each attached node records its interface, netns and pid, so `cleanup` can undo a crash."""


def _is_bpffs(mountinfo: Path, where: str) -> bool:
    try:
        for line in mountinfo.read_text().splitlines():
            left, _, right = line.partition(" - ")
            if left.split()[4] == where and right.split()[0] == "bpf":
                return True
    except OSError:
        return False
    return False


_bpffs_fd: int | None = None


def _ancestors() -> Iterator[int]:
    pid = os.getppid()
    seen = {os.getpid()}
    while pid > 0 and pid not in seen:
        seen.add(pid)
        yield pid
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return
    yield 1


def bpffs_root() -> Path:
    """A bpffs that every process of this host sees; mounted at /sys/fs/bpf when none is.

    `ip netns exec` gives a process a fresh /sys without bpffs, and a bpffs mounted there would
    be a private instance. So we look for the host's instance through the root of an ancestor
    that still sees it (the shell that ran `ip netns exec`), and hold it open by a descriptor.
    """
    global _bpffs_fd
    if _is_bpffs(Path("/proc/self/mountinfo"), str(BPFFS)):
        return BPFFS
    if _bpffs_fd is not None:
        return Path(f"/proc/self/fd/{_bpffs_fd}")
    for pid in _ancestors():
        if not _is_bpffs(Path(f"/proc/{pid}/mountinfo"), str(BPFFS)):
            continue
        try:
            _bpffs_fd = os.open(f"/proc/{pid}/root/sys/fs/bpf", os.O_PATH | os.O_DIRECTORY)
        except OSError:
            continue
        log.info("using the host bpffs through the root of pid %d", pid)
        return Path(f"/proc/self/fd/{_bpffs_fd}")
    BPFFS.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise FastPathError(f"cannot mount bpffs at {BPFFS}: {res.stderr.strip()}")
    log.warning("mounted bpffs at %s; under `ip netns exec` it is private to the process", BPFFS)
    return BPFFS


def pin_name(node: str) -> str:
    """The node's folder name in bpffs, which refuses names with a dot ("r1.0" -> "r1%2E0")."""
    return node.replace("%", "%25").replace(".", "%2E")


def node_of_pin(name: str) -> str:
    """The node name of a pin folder (undoes pin_name)."""
    return name.replace("%2E", ".").replace("%25", "%")


def pin_dir(node: str) -> Path:
    """/sys/fs/bpf/jasper/<node>: the node's pinned maps (dots escaped, see pin_name)."""
    if not node or "/" in node or node.startswith("."):
        raise ValueError(f"bad node name {node!r}")
    return bpffs_root() / PIN_SUBDIR / pin_name(node)


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _write_state(node: str, record: dict[str, Any]) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_DIR / f".{node}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, STATE_DIR / f"{node}.json")


def record_path(node: str) -> Path:
    """The crash-state record of `node` under STATE_DIR."""
    return STATE_DIR / f"{node}.json"


def record_owner(node: str, *, role: str, ifname: str, hook: str, tc_prio: int) -> None:
    """Record that this process (pid, start time, netns) owns `node`'s fast path and where."""
    _write_state(
        node,
        {
            "node": node,
            "role": role,
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "netns_inode": netns_inode("thread-self"),
            "ifname": ifname,
            "hook": hook,
            "tc_prio": tc_prio,
            "pin_dir": str(BPFFS / PIN_SUBDIR / pin_name(node)),
            "attached_at_unix_s": int(time.time()),
        },
    )


def _owner_alive(record: dict[str, Any]) -> bool:
    pid = int(record.get("pid", 0))
    return pid > 0 and _start_time(pid) == record.get("start_time")


def _find_netns(inode: int) -> str | None:
    """A path that opens the network namespace with this inode, if one still exists."""
    candidates = [Path("/proc/self/ns/net"), Path("/proc/1/ns/net")]
    for d in (Path("/run/netns"), Path("/var/run/netns")):
        if d.is_dir():
            candidates += sorted(d.iterdir())
    for c in candidates:
        try:
            if c.stat().st_ino == inode:
                return str(c)
        except OSError:
            continue
    return None


def _detach_foreign(record: dict[str, Any]) -> bool:
    """Remove a crashed process's filter or XDP program, entering its netns with nsenter."""
    ns = _find_netns(int(record["netns_inode"]))
    if ns is None:
        return False  # the namespace is gone, and its interfaces and filters with it
    ifname = record["ifname"]
    if record.get("hook") == "xdp":
        cmd = ["ip", "link", "set", "dev", ifname, "xdp", "off"]
    else:
        prio = str(record["tc_prio"])
        way = "egress" if record.get("hook") == "tc-egress" else "ingress"
        cmd = ["tc", "filter", "del", "dev", ifname, way, "pref", prio]
    res = subprocess.run(["nsenter", f"--net={ns}", *cmd], capture_output=True, check=False)
    return res.returncode == 0


def _unpin(folder: Path) -> list[str]:
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        entry.unlink(missing_ok=True)
        removed.append(str(entry))
    folder.rmdir()
    removed.append(str(folder))
    return removed


def cleanup(node: str | None = None, *, force: bool = False) -> list[str]:
    """Remove what crashed fast-path processes left: TC filters, XDP programs, pins, records.

    Nodes whose owning process still runs are left alone unless `force`. Returns what it removed.
    """
    removed: list[str] = []
    records: dict[str, dict[str, Any]] = {}
    if STATE_DIR.is_dir():
        for f in STATE_DIR.glob("*.json"):
            try:
                records[f.stem] = json.loads(f.read_text())
            except (OSError, ValueError):
                records[f.stem] = {}
    root = bpffs_root() / PIN_SUBDIR
    pinned = {node_of_pin(p.name) for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    names = sorted(set(records) | pinned)
    if node is not None:
        names = [n for n in names if n == node]
    for name in names:
        record = records.get(name)
        if record and _owner_alive(record) and not force:
            log.info("fast path of %s still owned by pid %s; left alone", name, record["pid"])
            continue
        if record and record.get("ifname") and _detach_foreign(record):
            removed.append(f"{record.get('hook', 'tc')} program on {record['ifname']}")
        removed += _unpin(root / pin_name(name))
        state = STATE_DIR / f"{name}.json"
        if state.exists():
            state.unlink()
            removed.append(str(state))
    return removed


def status() -> list[dict[str, Any]]:
    """Every node with pinned maps: its record and current counters."""
    out: list[dict[str, Any]] = []
    root = bpffs_root() / PIN_SUBDIR
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        node = node_of_pin(folder.name)
        rec: dict[str, Any] = {"node": node}
        state = STATE_DIR / f"{node}.json"
        if state.exists():
            rec.update(json.loads(state.read_text()))
            rec["owner_alive"] = _owner_alive(rec)
        for stats, names in (("relay_stats", RELAY_COUNTERS), ("recv_stats", RECEIVER_COUNTERS)):
            if (folder / stats).exists():
                m = BpfMap.from_pin(folder / stats)
                try:
                    rec["counters"] = {n: m.sum_u64(i) for i, n in enumerate(names)}
                finally:
                    m.close()
        out.append(rec)
    return out
