"""libbpf through ctypes: the bindings, loaded objects, maps by descriptor, BPF_PROG_TEST_RUN."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class FastPathError(RuntimeError):
    """The fast path could not be set up or torn down (the message says why)."""


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


def prog_run_stats(prog_fd: int) -> tuple[int, int]:
    """(run time in ns, runs) of a loaded program; counted only while the sysctl
    kernel.bpf_stats_enabled is 1."""
    info = ctypes.create_string_buffer(PROG_INFO_SIZE)
    size = ctypes.c_uint32(PROG_INFO_SIZE)
    rc = _libbpf().bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(size))
    _check(rc, "program info")
    run_time, runs = struct.unpack_from("=QQ", info.raw, PROG_INFO_RUN_TIME_AT)
    return int(run_time), int(runs)


def require_libbpf() -> None:
    """Load libbpf once (raises FastPathError when it is not installed)."""
    _libbpf()
