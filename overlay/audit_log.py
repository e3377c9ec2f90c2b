"""Release audit log writer: buffered appends of 40-byte records to an append-only file."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from jasper.audit import (
    FLAG_LATE_ARRIVAL,
    AuditFormatError,
    AuditRecord,
    decode_header,
    encode_header,
    encode_record,
)
from jasper.clockbound import ClockBound, ClockStatus
from overlay.clocks import NodeClock

AUDIT_MODE = 0o640
"""Mode audit files are created with (and tightened to)."""


class AuditLogWriter:
    """Appends release records; one writer per file.

    Records collect in memory and go out in one write() per `flush_records` (O_APPEND, so a
    crash loses at most the unflushed tail and never corrupts what is on disk). An existing
    file is appended to after its header is checked. Thread-safe: a receiver appends from its
    release thread and from the event loop (late arrivals).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        node: str,
        endpoints: list[str],
        clock_source: str = "",
        flush_records: int = 1024,
    ) -> None:
        self.path = Path(path)
        self.flush_records = flush_records
        self.written = 0
        self._buf = bytearray()
        self._pending = 0
        self._lock = threading.Lock()
        meta: dict[str, Any] = {
            "node": node,
            "endpoints": endpoints,
            "clock_source": clock_source,
            "created_ns": time.time_ns(),
            "time_unit": "ns since the Unix epoch, receiver's corrected clock",
        }
        exists = self.path.exists() and self.path.stat().st_size > 0
        # 0640: the audit trail is the MPs' evidence of fair release; its group may read it,
        # nobody else. A file left wider by an older version is tightened too.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, AUDIT_MODE)
        with contextlib.suppress(PermissionError):
            os.fchmod(self._fd, AUDIT_MODE)
        if exists:
            with self.path.open("rb") as f:
                head = f.read(65536)
            try:
                decode_header(head)
            except AuditFormatError:
                os.close(self._fd)
                raise
        else:
            os.write(self._fd, encode_header(meta))

    def append(self, rec: AuditRecord) -> None:
        data = encode_record(rec)
        with self._lock:
            self._buf += data
            self._pending += 1
            if self._pending >= self.flush_records:
                self._flush_locked()

    def release(
        self,
        *,
        stream_id: int,
        seq: int,
        endpoint: int,
        deadline_ns: int,
        release_ns: int,
        bound: ClockBound,
        late_arrival: bool = False,
    ) -> None:
        """Record one release, taking the bound and status at `release_ns` from `bound`."""
        status = bound.status_at(release_ns)
        bound_ns = bound.bound_ns(release_ns) if status is not ClockStatus.UNKNOWN else None
        self.append(
            AuditRecord(
                stream_id=stream_id,
                seq=seq,
                endpoint=endpoint,
                deadline_ns=deadline_ns,
                release_ns=release_ns,
                bound_ns=-1 if bound_ns is None else bound_ns,
                status=status,
                flags=FLAG_LATE_ARRIVAL if late_arrival else 0,
            )
        )

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._buf:
            with memoryview(self._buf) as whole:
                view = whole
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
                view.release()
            self.written += self._pending
            self._buf.clear()
            self._pending = 0

    def close(self) -> None:
        if self._fd >= 0:
            self.flush()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReleaseAuditor:
    """What a receiver calls per release: maps its kernel-clock release stamp onto the node's
    clock, takes the bound in force at that instant, and appends the record.

    Receiver hook (overlay/receiver.py, `_after`):
        auditor.on_release(endpoint=ep.index, stream_id=stream, seq=seq,
                           deadline_ns=deadline, release_true_ns=release_ns, late=late)
    """

    def __init__(self, writer: AuditLogWriter, clock: NodeClock) -> None:
        self.writer = writer
        self.clock = clock

    def on_release(
        self,
        *,
        endpoint: int,
        stream_id: int,
        seq: int,
        deadline_ns: int,
        release_true_ns: int,
        late: bool = False,
    ) -> None:
        self.writer.release(
            stream_id=stream_id,
            seq=seq,
            endpoint=endpoint,
            deadline_ns=deadline_ns,
            release_ns=self.clock.reading_then(release_true_ns),
            bound=self.clock.bound_then(release_true_ns),
            late_arrival=late,
        )

    def close(self) -> None:
        self.writer.close()
