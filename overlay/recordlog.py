"""Ground-truth record buffers: preallocated numpy chunks, written as .npy files at exit."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from jasper.records import DELIVERY_DTYPE, SENT_DTYPE


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
