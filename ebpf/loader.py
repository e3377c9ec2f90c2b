"""Load, pin, attach and detach the Jasper eBPF programs (libbpf via ctypes, TC via pyroute2)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import functools
import ipaddress
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ebpf.build import BuildError, build

log = logging.getLogger(__name__)

BPFFS = Path("/sys/fs/bpf")
BPF_FS_MAGIC = 0xCAFE4A11
PIN_SUBDIR = "jasper"
STATE_DIR = Path(os.environ.get("JASPER_EBPF_STATE_DIR", "/run/jasper/ebpf"))
"""Where each attached node records its interface, netns and pid, so `cleanup` can undo a crash."""

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

# Counter names in the order of the C enums in jasper_consts.h.
RELAY_COUNTERS = (
    "in",
    "copies",
    "duplicates",
    "malformed",
    "no_neighbour",
    "fib_fallback",
    "clone_failed",
    "no_targets",
    "passed",
    "clone_seen",
)
RECEIVER_COUNTERS = ("in", "accepted", "duplicates", "not_parent", "malformed", "passed")

# struct jasper_target / jasper_target_table / jasper_parent_key from jasper_structs.h. Addresses
# and ports are packed as raw network-order bytes; ifindex and count are host order.
TARGET = struct.Struct("=I4s4s2s2s6s6sB3x")
TABLE_HEAD = struct.Struct("=2sHI")
PARENT_KEY = struct.Struct("=4s2s2x")
TARGET_HEDGE = 0x01
TARGET_FIB = 0x02
TABLE_CSUM_HELPERS = 0x01

# Neighbour states whose MAC we trust enough to write into the target table.
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERM


class FastPathError(RuntimeError):
    """The fast path could not be set up or torn down (the message says why)."""


# ---------------------------------------------------------------------------------------------
# libbpf through ctypes


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts of libbpf 1.x."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    """The leading fields of struct bpf_map_info."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("pad", ctypes.c_uint8 * 64),
    ]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libbpf_log: list[str] = []


def _libbpf_print(level: int, fmt: bytes, args: int) -> int:
    # libbpf hands us printf arguments as a va_list; vsnprintf formats them.
    buf = ctypes.create_string_buffer(4096)
    _libc.vsnprintf(buf, ctypes.c_size_t(len(buf)), fmt, ctypes.c_void_p(args))
    text = buf.value.decode(errors="replace")
    _libbpf_log.append(text)
    del _libbpf_log[:-400]
    return 0


_on_libbpf_print = _PRINT_FN(_libbpf_print)


def _libbpf() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise FastPathError(f"libbpf not loadable ({e}); install libbpf1 / libbpf-dev") from e
    vp, ci, cu32, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "bpf_object__open_file": (vp, [cp, vp]),
        "bpf_object__load": (ci, [vp]),
        "bpf_object__close": (None, [vp]),
        "bpf_object__find_program_by_name": (vp, [vp, cp]),
        "bpf_object__find_map_by_name": (vp, [vp, cp]),
        "bpf_object__pin_maps": (ci, [vp, cp]),
        "bpf_program__fd": (ci, [vp]),
        "bpf_map__fd": (ci, [vp]),
        "bpf_map_update_elem": (ci, [ci, vp, vp, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (ci, [ci, vp, vp]),
        "bpf_map_delete_elem": (ci, [ci, vp]),
        "bpf_map_get_next_key": (ci, [ci, vp, vp]),
        "bpf_map_update_batch": (ci, [ci, vp, vp, ctypes.POINTER(cu32), vp]),
        "bpf_obj_get": (ci, [cp]),
        "bpf_obj_get_info_by_fd": (ci, [ci, vp, ctypes.POINTER(cu32)]),
        "bpf_prog_test_run_opts": (ci, [ci, ctypes.POINTER(_TestRunOpts)]),
        "libbpf_num_possible_cpus": (ci, []),
        "libbpf_set_print": (vp, [_PRINT_FN]),
    }
    for fn, (res, args) in sigs.items():
        f = getattr(lib, fn)
        f.restype = res
        f.argtypes = args
    lib.libbpf_set_print(_on_libbpf_print)
    _lib = lib
    return lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        code = -rc if rc != -1 else ctypes.get_errno()
        raise FastPathError(f"{what}: {os.strerror(code)} (errno {code})")
    return rc


class BpfMap:
    """A map by file descriptor: fixed-size keys and values as bytes (per-CPU values summed)."""

    def __init__(self, fd: int, *, owned: bool = False) -> None:
        lib = _libbpf()
        info = _MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        _check(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
        self.fd = fd
        self.owned = owned
        self.name = info.name.decode()
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        # BPF_MAP_TYPE_PERCPU_HASH = 5, PERCPU_ARRAY = 6: user space sees one value per CPU.
        self.ncpus = lib.libbpf_num_possible_cpus() if info.type in (5, 6) else 1
        self._stride = (self.value_size + 7) // 8 * 8 if self.ncpus > 1 else self.value_size

    @classmethod
    def from_pin(cls, path: Path) -> BpfMap:
        fd = _libbpf().bpf_obj_get(str(path).encode())
        _check(fd, f"open pinned map {path}")
        return cls(fd, owned=True)

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        kb = ctypes.create_string_buffer(key, self.key_size)
        vb = ctypes.create_string_buffer(value, self._stride * self.ncpus)
        _check(_libbpf().bpf_map_update_elem(self.fd, kb, vb, flags), f"update {self.name}")

    def lookup(self, key: bytes) -> list[bytes] | None:
        """The value (one per possible CPU for per-CPU maps), or None when the key is absent."""
        kb = ctypes.create_string_buffer(key, self.key_size)
        vb = ctypes.create_string_buffer(self._stride * self.ncpus)
        if _libbpf().bpf_map_lookup_elem(self.fd, kb, vb) < 0:
            return None
        raw = vb.raw
        step, size = self._stride, self.value_size
        return [raw[i * step : i * step + size] for i in range(self.ncpus)]

    def delete(self, key: bytes) -> None:
        kb = ctypes.create_string_buffer(key, self.key_size)
        _libbpf().bpf_map_delete_elem(self.fd, kb)

    def keys(self) -> Iterator[bytes]:
        lib = _libbpf()
        cur: ctypes.Array[ctypes.c_char] | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while lib.bpf_map_get_next_key(self.fd, cur, nxt) == 0:
            yield nxt.raw
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)

    def zero_array(self) -> None:
        """Zero every entry of an array map in one batch (the duplicate rings, the counters)."""
        n = self.max_entries
        keys = (ctypes.c_uint32 * n)(*range(n))
        values = ctypes.create_string_buffer(self._stride * self.ncpus * n)
        count = ctypes.c_uint32(n)
        rc = _libbpf().bpf_map_update_batch(self.fd, keys, values, ctypes.byref(count), None)
        _check(rc, f"zero {self.name}")

    def sum_u64(self, index: int) -> int:
        vals = self.lookup(struct.pack("=I", index))
        return sum(struct.unpack("=Q", v)[0] for v in vals) if vals else 0

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BpfObject:
    """One compiled ELF object loaded into the kernel (programs verified, maps created)."""

    def __init__(self, path: Path) -> None:
        lib = _libbpf()
        del _libbpf_log[:]
        obj = lib.bpf_object__open_file(str(path).encode(), None)
        if not obj:
            raise FastPathError(f"open {path}: {os.strerror(ctypes.get_errno())}")
        rc = lib.bpf_object__load(obj)
        if rc < 0:
            lib.bpf_object__close(obj)
            tail = "".join(_libbpf_log[-30:])
            raise FastPathError(f"load {path.name}: {os.strerror(-rc)}\n{tail}")
        self._obj: int | None = obj

    def _ptr(self) -> int:
        if self._obj is None:
            raise FastPathError("object closed")
        return self._obj

    def prog_fd(self, name: str) -> int:
        prog = _libbpf().bpf_object__find_program_by_name(self._ptr(), name.encode())
        if not prog:
            raise FastPathError(f"no program {name}")
        return int(_check(_libbpf().bpf_program__fd(prog), f"fd of {name}"))

    def map(self, name: str) -> BpfMap:
        m = _libbpf().bpf_object__find_map_by_name(self._ptr(), name.encode())
        if not m:
            raise FastPathError(f"no map {name}")
        return BpfMap(_check(_libbpf().bpf_map__fd(m), f"fd of {name}"))

    def pin_maps(self, folder: Path) -> None:
        _check(_libbpf().bpf_object__pin_maps(self._ptr(), str(folder).encode()), f"pin {folder}")

    def close(self) -> None:
        if self._obj is not None:
            _libbpf().bpf_object__close(self._obj)
            self._obj = None


@dataclass(frozen=True)
class TestRun:
    """Outcome of one BPF_PROG_TEST_RUN."""

    retval: int
    """The program's return code (TC_ACT_* or XDP_*)."""
    data: bytes
    """The packet as the program left it."""


# struct bpf_prog_info (linux/bpf.h): size and where run_time_ns and run_cnt sit;
# tests/test_ebpf_wire_layout.py checks both against the C header.
PROG_INFO_SIZE = 232
PROG_INFO_RUN_TIME_AT = 192

SK_BUFF_CTX_SIZE = 192
"""sizeof(struct __sk_buff); `mark` sits at offset 8."""


def prog_test_run(prog_fd: int, packet: bytes, *, mark: int = 0) -> TestRun:
    """Run a loaded program once on `packet` (BPF_PROG_TEST_RUN). Clones leave for real.

    `mark` (TC programs only) presets skb->mark through the __sk_buff context.
    """
    out = ctypes.create_string_buffer(len(packet) + 512)
    inp = ctypes.create_string_buffer(packet, len(packet))
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(inp, ctypes.c_void_p),
        data_out=ctypes.cast(out, ctypes.c_void_p),
        data_size_in=len(packet),
        data_size_out=len(out),
        repeat=1,
    )
    if mark:
        ctx = ctypes.create_string_buffer(SK_BUFF_CTX_SIZE)
        struct.pack_into("=I", ctx, 8, mark)
        opts.ctx_in = ctypes.cast(ctx, ctypes.c_void_p)
        opts.ctx_size_in = SK_BUFF_CTX_SIZE
    _check(_libbpf().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return TestRun(retval=opts.retval, data=out.raw[: opts.data_size_out])


# ---------------------------------------------------------------------------------------------
# bpffs, pins and crash records


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
    return name.replace("%2E", ".").replace("%25", "%")


def pin_dir(node: str) -> Path:
    """/sys/fs/bpf/jasper/<node>: the node's pinned maps (dots escaped, see pin_name)."""
    if not node or "/" in node or node.startswith("."):
        raise ValueError(f"bad node name {node!r}")
    return bpffs_root() / PIN_SUBDIR / pin_name(node)


def _netns_inode(pid: int | str = "self") -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


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


# ---------------------------------------------------------------------------------------------
# Availability

_available: tuple[bool, str] | None = None


def fast_path_available() -> tuple[bool, str]:
    """(usable, reason when not): root, libbpf, clang, bpffs, both programs pass the verifier."""
    global _available
    if _available is not None:
        return _available
    try:
        if os.geteuid() != 0:
            raise FastPathError("needs root (CAP_BPF and CAP_NET_ADMIN)")
        _libbpf()
        bpffs_root()
        for program in ("relay", "receiver"):
            BpfObject(build(program)).close()
        _available = (True, "")
    except (FastPathError, BuildError, OSError) as e:
        _available = (False, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return _available


# ---------------------------------------------------------------------------------------------
# Attaching


CLONE_NEWNET = 0x40000000


@contextmanager
def _in_netns(ns_fd: int | None) -> Iterator[None]:
    """Run the body in the network namespace `ns_fd` (the one attach ran in), then come back.
    A daemon lives in one namespace; this matters to callers that hop between several."""
    if ns_fd is None or os.fstat(ns_fd).st_ino == _netns_inode("thread-self"):
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
            raise FastPathError(f"setns: {os.strerror(ctypes.get_errno())}")
        yield
    finally:
        _libc.setns(home, CLONE_NEWNET)
        os.close(home)


_T = TypeVar("_T")


def _off_event_loop(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Run `fn` in a worker thread when the caller's thread runs an asyncio loop: pyroute2's
    synchronous API drives an event loop of its own and refuses to run inside another. The
    worker inherits the caller's network namespace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> _T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=work, name=f"jasper-ebpf-{fn.__name__}")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    return wrapper


def _ipr() -> Any:
    from pyroute2 import IPRoute  # only where something is attached: keeps imports light

    return IPRoute()


@_off_event_loop
def interface_of(addr: str) -> str:
    """Name of the interface in this netns that holds IPv4 `addr` (where a node bound to it
    receives): the `ifname` to attach to. 127.0.0.0/8 is on `lo`."""
    if ipaddress.IPv4Address(addr).is_loopback:
        return "lo"
    with _ipr() as ipr:
        for a in ipr.get_addr(family=socket.AF_INET):
            if a.get_attr("IFA_ADDRESS") == addr or a.get_attr("IFA_LOCAL") == addr:
                link = ipr.get_links(a["index"])[0]
                return str(link.get_attr("IFLA_IFNAME"))
    raise FastPathError(f"no interface holds {addr} in this network namespace")


def _ifindex(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise FastPathError(f"no interface {ifname} in this network namespace")
    return int(found[0])


def tc_prio(role: str, node: str, attempt: int = 0) -> int:
    """The TC filter priority of a node's program (attempt > 0 after a collision)."""
    return TC_PRIO_BASE + (zlib.crc32(f"{role}/{node}".encode()) + attempt) % TC_PRIO_SPAN


def _tc_attach(
    ifname: str, prog_fd: int, name: str, prios: Sequence[int], parent: int = TC_INGRESS_PARENT
) -> int:
    """Attach at clsact ingress under the first free priority of `prios`; returns it."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _ipr() as ipr:
        idx = _ifindex(ipr, ifname)
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


def _tc_detach(ifname: str, prio: int, parent: int = TC_INGRESS_PARENT) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    with _ipr() as ipr:
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
            left = list(ipr.get_filters(idx, parent=0xFFFFFFF2)) + list(
                ipr.get_filters(idx, parent=0xFFFFFFF3)
            )
            if not left:
                ipr.tc("del", "clsact", idx)
        except NetlinkError:
            pass


@_off_event_loop
def attach_tc(ifname: str, prog_fd: int, name: str, *, egress: bool = False) -> int:
    """Attach any loaded TC program at clsact ingress (or egress) of `ifname` in this netns,
    under a free priority derived from `name`; returns the priority (for detach_tc)."""
    prios = [tc_prio("tc", name, i) for i in range(16)]
    return _tc_attach(
        ifname, prog_fd, name, prios, TC_EGRESS_PARENT if egress else TC_INGRESS_PARENT
    )


@_off_event_loop
def detach_tc(ifname: str, prio: int, *, egress: bool = False) -> None:
    _tc_detach(ifname, prio, TC_EGRESS_PARENT if egress else TC_INGRESS_PARENT)


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
        record = STATE_DIR / f"{self.node}.json"
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
        _write_state(
            self.node,
            {
                "node": self.node,
                "role": self.role,
                "pid": os.getpid(),
                "start_time": _start_time(os.getpid()),
                "netns_inode": _netns_inode("thread-self"),
                "ifname": self.ifname,
                "hook": self.hook,
                "tc_prio": self.tc_prio,
                "pin_dir": str(BPFFS / PIN_SUBDIR / pin_name(self.node)),
                "attached_at_unix_s": int(time.time()),
            },
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
            with _ipr() as ipr:
                idx = _ifindex(ipr, self.ifname)
                ipr.link("set", index=idx, xdp_fd=self.prog_fd)
        else:
            prios = [tc_prio(self.role, self.node, i) for i in range(16)]
            parent = TC_EGRESS_PARENT if self.hook == "tc-egress" else TC_INGRESS_PARENT
            self.tc_prio = _tc_attach(self.ifname, self.prog_fd, self.prog_name, prios, parent)
        self._attached = True
        self._record()

    def prog_stats(self) -> tuple[int, int]:
        """(run time in ns, runs) of the attached program; counted only while the sysctl
        kernel.bpf_stats_enabled is 1 (bench/fastpath.py turns it on)."""
        info = ctypes.create_string_buffer(PROG_INFO_SIZE)
        size = ctypes.c_uint32(PROG_INFO_SIZE)
        rc = _libbpf().bpf_obj_get_info_by_fd(self.prog_fd, info, ctypes.byref(size))
        _check(rc, "program info")
        run_time, runs = struct.unpack_from("=QQ", info.raw, PROG_INFO_RUN_TIME_AT)
        return int(run_time), int(runs)

    @_off_event_loop
    def close(self) -> None:
        """Detach, unpin, remove the node's folder and record. Safe to call twice."""
        if self._attached:
            try:
                with _in_netns(self._netns_fd):
                    if self.hook == "xdp":
                        with _ipr() as ipr:
                            found = ipr.link_lookup(ifname=self.ifname)
                            if found:
                                ipr.link("set", index=found[0], xdp_fd=-1)
                    else:
                        parent = TC_EGRESS_PARENT if self.hook == "tc-egress" else TC_INGRESS_PARENT
                        _tc_detach(self.ifname, self.tc_prio, parent)
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
            (STATE_DIR / f"{self.node}.json").unlink(missing_ok=True)
            self._recorded = False

    def _counters(self, stats: str, names: Sequence[str]) -> dict[str, int]:
        m = self._map(stats)
        return {n: m.sum_u64(i) for i, n in enumerate(names)}

    def __enter__(self) -> _Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _mac_bytes(mac: str | None) -> bytes:
    return bytes.fromhex(mac.replace(":", "")) if mac else bytes(6)


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
        """The table last written, with how each MAC was found."""
        self.unroutable: tuple[tuple[str, int, bool], ...] = ()
        """Targets left out because this namespace has no route to them."""

    @property
    def max_targets(self) -> int:
        return int(self._map("relay_targets").value_size - TABLE_HEAD.size) // TARGET.size

    @_off_event_loop
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

    def _write_table(self, targets: Sequence[ResolvedTarget]) -> None:
        m = self._map("relay_targets")
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
        m.update(struct.pack("=I", 0), body.ljust(m.value_size, b"\0"))
        self.targets = tuple(targets)

    @_off_event_loop
    def set_targets(self, targets: Sequence[tuple[str, int, bool]]) -> None:
        """Replace the copy targets: (IPv4, UDP port, is_hedge) each, resolved here and now.

        A target whose next-hop MAC is not in the neighbour table is resolved per packet with
        bpf_fib_lookup (counted as fib_fallback, or no_neighbour when that fails too).
        """
        resolved: list[ResolvedTarget] = []
        unroutable: list[tuple[str, int, bool]] = []
        with _in_netns(self._netns_fd), _ipr() as ipr:
            for ip, port, hedge in targets:
                r = resolve_target(ipr, ip, int(port), bool(hedge), self.listen_addr)
                if r is None:
                    unroutable.append((ip, port, hedge))
                else:
                    resolved.append(r)
        if unroutable:
            log.warning("relay %s: no route to targets %s", self.node, unroutable)
        self.unroutable = tuple(unroutable)
        self._write_table(resolved)

    def counters(self) -> dict[str, int]:
        """Kernel counters summed over CPUs, plus how the current targets were resolved."""
        c = self._counters("relay_stats", RELAY_COUNTERS)
        c["targets"] = len(self.targets)
        c["targets_fib"] = sum(1 for t in self.targets if t.dmac is None)
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

    @_off_event_loop
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
