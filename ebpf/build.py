"""Compile the eBPF programs with clang, once per source hash, into a cache folder."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
PROGRAMS = {"relay": "relay.bpf.c", "receiver": "receiver.bpf.c"}
"""Program role -> C file."""
HEADERS = (
    "jasper_consts.h",
    "jasper_structs.h",
    "jasper_maps.h",
    "jasper_helpers.h",
    "include/jasper_wire.h",
)
# -mcpu=v3: the 64-bit compare-and-swap of the duplicate ring is a v3 (atomics) instruction.
CFLAGS = ("-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror")


class BuildError(RuntimeError):
    """The programs could not be compiled (no clang, or the compiler rejected the source)."""


def find_clang() -> str | None:
    """Path of the clang to use: $JASPER_CLANG, else `clang` on PATH."""
    wanted = os.environ.get("JASPER_CLANG", "clang")
    return shutil.which(wanted)


def cache_dir() -> Path:
    """ebpf/.cache next to the sources when writable, else ~/.cache/jasper (or $XDG_CACHE_HOME)."""
    local = SOURCE_DIR / ".cache"
    try:
        local.mkdir(exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = base / "jasper"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _include_flags() -> list[str]:
    flags = ["-I", str(SOURCE_DIR), "-I", str(SOURCE_DIR / "include")]
    # With -target bpf clang does not search the multiarch folder that holds <asm/types.h>.
    multiarch = Path(f"/usr/include/{platform.machine()}-linux-gnu")
    if multiarch.is_dir():
        flags += ["-I", str(multiarch)]
    return flags


def source_hash(program: str, clang_version: str, defines: Mapping[str, int]) -> str:
    """Hash of everything the object depends on: sources, compiler, flags and -D values."""
    h = hashlib.sha256()
    for name in (PROGRAMS[program], *HEADERS):
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    h.update(clang_version.encode())
    h.update(" ".join(CFLAGS).encode())
    h.update(repr(sorted(defines.items())).encode())
    return h.hexdigest()[:20]


def build(
    program: str,
    *,
    defines: Mapping[str, int] | None = None,
    out_dir: Path | None = None,
    force: bool = False,
) -> Path:
    """Compile one program (`relay` or `receiver`) and return the object file's path.

    The object is reused while its sources, compiler and flags are unchanged. Raises BuildError
    with the compiler's message when clang is missing or fails.
    """
    if program not in PROGRAMS:
        raise ValueError(f"unknown program {program!r}; one of {sorted(PROGRAMS)}")
    defines = dict(defines or {})
    clang = find_clang()
    if clang is None:
        raise BuildError(
            "clang not found: the eBPF fast path needs clang and libbpf headers "
            "(Debian: apt-get install clang llvm libbpf-dev), or set JASPER_CLANG"
        )
    version = subprocess.run(
        [clang, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    digest = source_hash(program, version[0] if version else clang, defines)
    target_dir = out_dir or cache_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    obj = target_dir / f"{program}-{digest}.o"
    if obj.exists() and not force:
        return obj
    cmd = [clang, *CFLAGS, *_include_flags()]
    cmd += [f"-D{k}={v}" for k, v in sorted(defines.items())]
    # Compile to a temporary name and rename: concurrent builders never see half an object.
    fd, tmp = tempfile.mkstemp(prefix=f".{program}-", suffix=".o", dir=target_dir)
    os.close(fd)
    cmd += ["-c", str(SOURCE_DIR / PROGRAMS[program]), "-o", tmp]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise BuildError(f"clang failed on {PROGRAMS[program]}:\n{res.stderr.strip()}")
    os.replace(tmp, obj)
    return obj


def build_all(*, force: bool = False) -> dict[str, Path]:
    """Compile every program; returns role -> object path."""
    return {name: build(name, force=force) for name in PROGRAMS}
