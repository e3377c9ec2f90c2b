"""Modes of the files the controller writes: its database owner-only, its logs group-readable."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO

DB_MODE = 0o600
"""The SQLite file and its -wal/-shm: MP token hashes and node credentials live there."""
LOG_MODE = 0o640
"""Logs and audit files: the service's group (operators, log shippers) may read them."""


def restrict(fd: int, mode: int) -> None:
    """Set `mode` on an open file we own (a file created earlier with a wider mode included);
    a file someone else owns keeps its mode, as chmod would fail."""
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, mode)


def prepare_database(path: str) -> None:
    """Create the SQLite file (and tighten an existing one and its -wal/-shm) to DB_MODE
    before SQLite opens it: SQLite creates files 0644 less the umask, and gives the -wal and
    -shm files the database file's mode."""
    if path in (":memory:", ""):
        return
    for p in (path, path + "-wal", path + "-shm"):
        flags = os.O_RDWR | (os.O_CREAT if p == path else 0)
        try:
            fd = os.open(p, flags, DB_MODE)
        except FileNotFoundError:
            continue
        try:
            restrict(fd, DB_MODE)
        finally:
            os.close(fd)


def open_log(path: str | os.PathLike[str]) -> BinaryIO:
    """`path` opened for appending, created (or tightened) to LOG_MODE."""
    fd = os.open(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_MODE)
    restrict(fd, LOG_MODE)
    return os.fdopen(fd, "ab")
