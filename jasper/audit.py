"""Release audit log: the compact append-only record layout, and the summary with its flags.

File = header, then fixed 40-byte records, little endian:

    header:  magic "JASPRAUD" (8) | version u16 | record_size u16 | meta_len u32 | meta (JSON)
    record:  stream_id u32 | endpoint u32 | seq u64 | deadline_ns i64 | release_ns i64 |
             bound_ns u32 | status u8 | flags u8 | reserved u16

Times are ns since the epoch on the receiver's corrected clock; `bound_ns` is that clock's
error bound at the release (saturated at BOUND_SATURATED). A record cut short by a crash is
counted as truncated, never raised. The JSON meta names the node and its endpoints.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jasper.clockbound import ClockStatus

MAGIC = b"JASPRAUD"
VERSION = 1
_HEADER = struct.Struct("<8sHHI")
_RECORD = struct.Struct("<IIQqqIBBH")
RECORD_SIZE = _RECORD.size
BOUND_SATURATED = 0xFFFFFFFF
"""Stored when the bound is unknown or above ~4.3 s."""

FLAG_LATE_ARRIVAL = 0x01
"""The message arrived after its deadline and was released at once."""
FLAG_CLAMPED = 0x02
"""The deadline was raised to keep the stream's deadlines non-decreasing."""

AUDIT_DTYPE = np.dtype(
    [
        ("stream_id", "<u4"),
        ("endpoint", "<u4"),
        ("seq", "<u8"),
        ("deadline_ns", "<i8"),
        ("release_ns", "<i8"),
        ("bound_ns", "<u4"),
        ("status", "u1"),
        ("flags", "u1"),
        ("reserved", "<u2"),
    ]
)
"""The record layout as a numpy dtype, for reading whole files at once."""

RTS25_MAX_DIVERGENCE_NS = 100_000
"""MiFID II RTS 25, venues with gateway-to-gateway latency under 1 ms: 100 µs from UTC."""
RTS25_GRANULARITY_NS = 1_000
"""... and timestamps at 1 µs granularity or finer."""


class AuditFormatError(ValueError):
    """A file that is not a Jasper audit log (bad magic, version or layout)."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One release of one message to one endpoint."""

    stream_id: int
    """Stream of the message."""
    seq: int
    """Sequence number of the message."""
    endpoint: int
    """Endpoint index within the receiver (names in the file's meta)."""
    deadline_ns: int
    """Deadline in force, ns since the epoch."""
    release_ns: int
    """Receiver's corrected clock when the message was handed over, ns since the epoch."""
    bound_ns: int
    """That clock's error bound at the release, ns (BOUND_SATURATED = unknown)."""
    status: ClockStatus
    """Clock status at the release."""
    flags: int = 0
    """FLAG_* bits."""

    @property
    def divergence_ns(self) -> int:
        """Release minus deadline, on the receiver's clock."""
        return self.release_ns - self.deadline_ns


@dataclass(frozen=True, slots=True)
class AuditHeader:
    """What precedes the records."""

    version: int
    """Layout version."""
    record_size: int
    """Bytes per record."""
    meta: dict[str, Any]
    """Node name, endpoint names, clock source, created_ns."""
    length: int
    """Header length in bytes: where the first record starts."""


def encode_header(meta: dict[str, Any]) -> bytes:
    body = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return _HEADER.pack(MAGIC, VERSION, RECORD_SIZE, len(body)) + body


def decode_header(data: bytes) -> AuditHeader:
    if len(data) < _HEADER.size:
        raise AuditFormatError(f"too short for a header: {len(data)} bytes")
    magic, version, record_size, meta_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise AuditFormatError(f"not an audit log (magic {magic!r})")
    if version != VERSION or record_size != RECORD_SIZE:
        raise AuditFormatError(f"unsupported version {version} / record size {record_size}")
    end = _HEADER.size + meta_len
    if len(data) < end:
        raise AuditFormatError("header meta cut short")
    try:
        meta = json.loads(data[_HEADER.size : end])
    except ValueError as exc:
        raise AuditFormatError(f"bad meta: {exc}") from exc
    if not isinstance(meta, dict):
        raise AuditFormatError("meta is not an object")
    return AuditHeader(version=version, record_size=record_size, meta=meta, length=end)


def saturate_bound(bound_ns: int | None) -> int:
    if bound_ns is None or bound_ns < 0 or bound_ns >= BOUND_SATURATED:
        return BOUND_SATURATED
    return bound_ns


def encode_record(rec: AuditRecord) -> bytes:
    return _RECORD.pack(
        rec.stream_id,
        rec.endpoint,
        rec.seq,
        rec.deadline_ns,
        rec.release_ns,
        saturate_bound(rec.bound_ns),
        int(rec.status),
        rec.flags,
        0,
    )


def decode_records(data: bytes) -> tuple[AuditHeader, np.ndarray, int]:
    """Header, all whole records as an AUDIT_DTYPE array, and the count of trailing bytes."""
    header = decode_header(data)
    body = memoryview(data)[header.length :]
    whole = len(body) // RECORD_SIZE * RECORD_SIZE
    arr = np.frombuffer(body[:whole], dtype=AUDIT_DTYPE).copy()
    return header, arr, len(body) - whole


def record_at(arr: np.ndarray, i: int) -> AuditRecord:
    r = arr[i]
    status = int(r["status"])
    return AuditRecord(
        stream_id=int(r["stream_id"]),
        seq=int(r["seq"]),
        endpoint=int(r["endpoint"]),
        deadline_ns=int(r["deadline_ns"]),
        release_ns=int(r["release_ns"]),
        bound_ns=int(r["bound_ns"]),
        status=ClockStatus(status) if status in (0, 1, 2) else ClockStatus.UNKNOWN,
        flags=int(r["flags"]),
    )


@dataclass(frozen=True, slots=True)
class Distribution:
    """Order statistics of one quantity, ns."""

    p50: int
    p99: int
    p999: int
    max: int
    min: int

    @classmethod
    def of(cls, values: np.ndarray) -> Distribution:
        if values.size == 0:
            return cls(0, 0, 0, 0, 0)
        q = np.percentile(values, [50, 99, 99.9], method="higher")
        return cls(int(q[0]), int(q[1]), int(q[2]), int(values.max()), int(values.min()))


@dataclass(frozen=True, slots=True)
class AuditSummary:
    """What `jasper audit` reports about one or more logs."""

    releases: int
    """Records read."""
    truncated_bytes: int
    """Bytes after the last whole record (a crash mid-write)."""
    divergence: Distribution
    """Release minus deadline on the receiver's clock, ns."""
    bound: Distribution
    """Clock error bound at release, ns (known bounds only)."""
    worst_case_utc_divergence_ns: int
    """Largest |release - deadline| + bound: how far from the deadline in UTC a release may be."""
    early: int
    """Releases before their deadline on the receiver's clock."""
    late_arrivals: int
    """Messages that arrived after their deadline."""
    unsynchronized: int
    """Releases whose clock was not synchronized (status free-running or unknown)."""
    unknown_bound: int
    """Releases with no known bound."""
    over_threshold: int
    """Releases whose bound exceeded the threshold."""
    threshold_ns: int
    """The bound threshold used for flagging."""
    flagged_examples: list[AuditRecord] = field(default_factory=list)
    """The first few flagged records."""
    per_endpoint: dict[str, int] = field(default_factory=dict)
    """Releases per endpoint name."""

    @property
    def flagged(self) -> int:
        """Releases not provably within the threshold of UTC."""
        return self.over_threshold + self.unsynchronized + self.unknown_bound

    @property
    def meets_rts25(self) -> bool:
        """Every release carries a synchronized bound within 100 µs (granularity is 1 ns)."""
        return self.releases > 0 and self.flagged == 0


def summarize(
    logs: Sequence[tuple[AuditHeader, np.ndarray, int]],
    *,
    threshold_ns: int = RTS25_MAX_DIVERGENCE_NS,
    examples: int = 5,
) -> AuditSummary:
    """Summarize decoded logs; a release is flagged when its bound exceeds `threshold_ns`,
    is unknown, or its clock was not synchronized."""
    arrays = [a for _, a, _ in logs]
    arr = np.concatenate(arrays) if arrays else np.zeros(0, dtype=AUDIT_DTYPE)
    div = arr["release_ns"].astype(np.int64) - arr["deadline_ns"].astype(np.int64)
    bounds = arr["bound_ns"].astype(np.int64)
    known = bounds != BOUND_SATURATED
    unsynced = arr["status"] != int(ClockStatus.SYNCHRONIZED)
    # Unsynchronized releases are counted once, under unsynchronized, even if over threshold.
    over = known & (bounds > threshold_ns) & ~unsynced
    unknown = ~known & ~unsynced
    flagged_mask = over | unknown | unsynced
    worst = np.abs(div[known]) + bounds[known]
    per_endpoint: dict[str, int] = {}
    for header, a, _ in logs:
        names = header.meta.get("endpoints", [])
        node = header.meta.get("node", "?")
        if a.size == 0:
            continue
        idx, counts = np.unique(a["endpoint"], return_counts=True)
        for i, c in zip(idx.tolist(), counts.tolist(), strict=True):
            name = names[i] if isinstance(names, list) and i < len(names) else f"{node}/{i}"
            per_endpoint[str(name)] = per_endpoint.get(str(name), 0) + int(c)
    flagged_idx = np.flatnonzero(flagged_mask)[:examples]
    return AuditSummary(
        releases=int(arr.size),
        truncated_bytes=sum(t for _, _, t in logs),
        divergence=Distribution.of(div),
        bound=Distribution.of(bounds[known]),
        worst_case_utc_divergence_ns=int(worst.max()) if worst.size else 0,
        early=int((div < 0).sum()),
        late_arrivals=int(((arr["flags"] & FLAG_LATE_ARRIVAL) != 0).sum()),
        unsynchronized=int(unsynced.sum()),
        unknown_bound=int(unknown.sum()),
        over_threshold=int(over.sum()),
        threshold_ns=threshold_ns,
        flagged_examples=[record_at(arr, int(i)) for i in flagged_idx],
        per_endpoint=per_endpoint,
    )
