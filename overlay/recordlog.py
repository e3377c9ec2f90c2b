"""Ground-truth record buffers (preallocated numpy chunks) and their files: sent.npy, and per
receiver host releases-{node}.npz (RELEASE_DTYPE with its name tables)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from jasper.records import (
    DELIVERY_DTYPE,
    NO_PARENT,
    RELEASE_DTYPE,
    SENT_DTYPE,
    Releases,
    concat_releases,
    empty_releases,
    expand_releases,
    releases_from_deliveries,
)


class RecordLog:
    """Rows of one record dtype in preallocated chunks; `append` never reallocates old rows.

    Thread-safe: the receiver appends from its release thread and, for late messages, from
    the event loop.
    """

    def __init__(self, dtype: np.dtype, *, chunk_rows: int = 16384) -> None:
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self._chunks: list[np.ndarray] = [np.zeros(chunk_rows, dtype=dtype)]
        self._fill = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return (len(self._chunks) - 1) * self.chunk_rows + self._fill

    def append(self, row: tuple[object, ...]) -> None:
        with self._lock:
            if self._fill == self.chunk_rows:
                self._chunks.append(np.zeros(self.chunk_rows, dtype=self.dtype))
                self._fill = 0
            self._chunks[-1][self._fill] = row
            self._fill += 1

    def extend(self, rows: np.ndarray) -> None:
        """Append many rows at once (the native data path books its releases in bulk)."""
        with self._lock:
            at = 0
            while at < len(rows):
                if self._fill == self.chunk_rows:
                    self._chunks.append(np.zeros(self.chunk_rows, dtype=self.dtype))
                    self._fill = 0
                take = min(self.chunk_rows - self._fill, len(rows) - at)
                self._chunks[-1][self._fill : self._fill + take] = rows[at : at + take]
                self._fill += take
                at += take

    def array(self) -> np.ndarray:
        with self._lock:
            parts = [*self._chunks[:-1], self._chunks[-1][: self._fill]]
            return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the rows to `path` (.npy) atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, self.array())
        os.replace(tmp, path)
        return path


def sent_log() -> RecordLog:
    return RecordLog(SENT_DTYPE)


def delivery_log() -> RecordLog:
    return RecordLog(DELIVERY_DTYPE)


class ReleaseRecords:
    """The Python receive path's ground truth: one RELEASE_DTYPE row per (datagram, endpoint)
    released, with the parent names it met. Reads like a per-message log (`len`, `array`)."""

    def __init__(self, endpoint_names: Callable[[], list[str]]) -> None:
        self._endpoint_names = endpoint_names
        self._rows = RecordLog(RELEASE_DTYPE)
        self._parent_ids: dict[str, int] = {}
        self._messages = 0

    def add(
        self,
        *,
        endpoint: int,
        parent: str,
        stream_id: int,
        session: int,
        seq: int,
        count: int,
        arrival_ns: int,
        release_ns: int,
        deadline_ns: int,
        synced: bool,
    ) -> None:
        """Book one released datagram at one endpoint (standing for `count` messages)."""
        pid = NO_PARENT
        if parent:
            pid = self._parent_ids.setdefault(parent, len(self._parent_ids))
        self._rows.append(
            (
                endpoint,
                pid,
                stream_id,
                session,
                seq,
                count,
                arrival_ns,
                release_ns,
                deadline_ns,
                synced,
            )
        )
        self._messages += count

    def __len__(self) -> int:
        """Rows the log stands for: messages delivered, per endpoint."""
        return self._messages

    def compact(self) -> Releases:
        return Releases(self._rows.array(), tuple(self._endpoint_names()), tuple(self._parent_ids))

    def array(self) -> np.ndarray:
        """One DELIVERY_DTYPE row per message (small runs and tests)."""
        return expand_releases(self.compact())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write releases-{node}.npz (`save_releases`)."""
        return save_releases(path, self.compact())


class CompactLog(Protocol):
    """A receiver's records that know their compact form (ReleaseRecords, nativepath's
    ReleaseLog)."""

    def compact(self) -> Releases: ...


def releases_of(log: CompactLog | RecordLog) -> Releases:
    """A receiver's records as Releases: compact logs as they are, per-message
    DELIVERY_DTYPE logs one record per row."""
    if isinstance(log, RecordLog):
        if log.dtype != DELIVERY_DTYPE:
            raise ValueError("a RecordLog of releases must hold DELIVERY_DTYPE rows")
        return releases_from_deliveries(log.array())
    return log.compact()


def save_releases(path: str | os.PathLike[str], releases: Releases) -> Path:
    """Write `releases` to `path` (.npz: arrays `releases`, `endpoints`, `parents`)
    atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: savez adds no ".npz" to its name
        np.savez(
            f,
            releases=releases.records,
            endpoints=np.array(releases.endpoints, dtype=str),
            parents=np.array(releases.parents, dtype=str),
        )
    os.replace(tmp, path)
    return path


def load_releases(path: str | os.PathLike[str]) -> Releases:
    """Read a file `save_releases` wrote."""
    with np.load(path, allow_pickle=False) as z:
        recs = z["releases"]
        if recs.dtype != RELEASE_DTYPE:
            raise ValueError(f"{path}: releases have dtype {recs.dtype}, not RELEASE_DTYPE")
        return Releases(
            recs,
            tuple(str(n) for n in z["endpoints"]),
            tuple(str(n) for n in z["parents"]),
        )


def load_run_releases(folder: str | os.PathLike[str]) -> Releases:
    """Every receiver host's records in `folder`: releases-{node}.npz, and for hosts that
    wrote none, deliveries-{node}.npy (per-message rows of older runs, one record each)."""
    folder = Path(folder)
    parts: list[Releases] = []
    nodes: set[str] = set()
    for p in sorted(folder.glob("releases-*.npz")):
        parts.append(load_releases(p))
        nodes.add(p.name.removeprefix("releases-").removesuffix(".npz"))
    for p in sorted(folder.glob("deliveries-*.npy")):
        if p.name.removeprefix("deliveries-").removesuffix(".npy") not in nodes:
            parts.append(releases_from_deliveries(np.load(p)))
    return concat_releases(parts) if parts else empty_releases()
