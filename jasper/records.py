"""Record layouts for ground truth: what the publisher sent and what each endpoint received."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

SENT_DTYPE = np.dtype(
    [
        ("stream_id", "<u4"),
        ("session", "<u4"),
        ("seq", "<u8"),
        ("send_time_ns", "<i8"),  # root send time stamped in the header (true clock)
        ("deadline_ns", "<i8"),  # deadline stamped in the header
    ]
)
"""One row per message the publisher sent: the expected set comes from here."""

DELIVERY_DTYPE = np.dtype(
    [
        ("endpoint", "U32"),  # endpoint name, e.g. "e17"
        ("stream_id", "<u4"),
        ("session", "<u4"),
        ("seq", "<u8"),
        ("arrival_ns", "<i8"),  # kernel timestamp of the first accepted copy (CLOCK_REALTIME)
        ("release_ns", "<i8"),  # true time the message was handed to the MP
        ("deadline_ns", "<i8"),  # deadline from the header
        ("parent", "U32"),  # relay whose copy was kept ("" when unknown)
        ("synced", "?"),  # the receiver's clock was synchronized at release
    ]
)
"""One row per (message, endpoint) first copy accepted and released."""


def empty_sent(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=SENT_DTYPE)


def empty_deliveries(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=DELIVERY_DTYPE)


RELEASE_DTYPE = np.dtype(
    [
        ("endpoint", "<u4"),  # index into the endpoint name table
        ("parent", "<u4"),  # index into the parent name table; beyond it: unknown
        ("stream_id", "<u4"),
        ("session", "<u4"),
        ("seq", "<u8"),  # first message of the datagram
        ("count", "<u2"),  # messages seq .. seq + count - 1
        ("arrival_ns", "<i8"),  # kernel timestamp of the first accepted copy (CLOCK_REALTIME)
        ("release_ns", "<i8"),  # true time the datagram's messages were handed to the MP
        ("deadline_ns", "<i8"),  # deadline from the header (one per datagram)
        ("synced", "?"),  # the receiver's clock was synchronized at release
    ]
)
"""One row per (datagram, endpoint) released to the MP: it stands for `count` DELIVERY_DTYPE rows
that share everything but `seq` (a datagram's messages share arrival, release, deadline and
parent at each endpoint)."""

NO_PARENT = 0xFFFFFFFF
"""Parent index of a copy whose sender no name table entry names (expanded as "")."""


@dataclass(frozen=True)
class Releases:
    """Release records with the name tables their `endpoint` and `parent` indices point into."""

    records: npt.NDArray[Any]
    """RELEASE_DTYPE rows."""
    endpoints: tuple[str, ...] = ()
    """Endpoint names by index."""
    parents: tuple[str, ...] = ()
    """Parent (relay or publisher) names by index."""

    def __post_init__(self) -> None:
        if self.records.dtype != RELEASE_DTYPE:
            raise ValueError("records must have RELEASE_DTYPE")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def messages(self) -> int:
        """(message, endpoint) pairs the records stand for: the expanded row count."""
        return int(self.records["count"].sum(dtype=np.int64))

    def select(self, mask: npt.NDArray[Any]) -> Releases:
        """The records where `mask` holds (a boolean array or indices), same name tables."""
        return Releases(self.records[mask], self.endpoints, self.parents)


def empty_releases() -> Releases:
    return Releases(np.zeros(0, dtype=RELEASE_DTYPE))


def releases_from_deliveries(rows: npt.NDArray[Any]) -> Releases:
    """One record of count 1 per DELIVERY_DTYPE row (same order): the exact compact form of
    per-message records, e.g. from runs written before RELEASE_DTYPE."""
    if rows.dtype != DELIVERY_DTYPE:
        raise ValueError("rows must have DELIVERY_DTYPE")
    out = np.zeros(len(rows), dtype=RELEASE_DTYPE)
    eps, ep_idx = np.unique(rows["endpoint"], return_inverse=True)
    parents, p_idx = np.unique(rows["parent"], return_inverse=True)
    out["endpoint"] = ep_idx.reshape(-1)
    out["parent"] = p_idx.reshape(-1)
    for name in ("stream_id", "session", "seq", "arrival_ns", "release_ns", "deadline_ns"):
        out[name] = rows[name]
    out["count"] = 1
    out["synced"] = rows["synced"]
    return Releases(out, tuple(str(e) for e in eps), tuple(str(p) for p in parents))


def message_offsets(counts: npt.NDArray[Any]) -> tuple[npt.NDArray[np.intp], npt.NDArray[Any]]:
    """For records of `counts` messages each: per message, its record's index and its offset in
    the record (0 .. count - 1), records in order."""
    counts = counts.astype(np.intp)
    src = np.repeat(np.arange(len(counts), dtype=np.intp), counts)
    starts = np.cumsum(counts) - counts
    offset = np.arange(len(src), dtype=np.intp)
    offset -= starts[src]
    return src, offset


def expand_releases(rel: Releases) -> npt.NDArray[Any]:
    """One DELIVERY_DTYPE row per message each record stands for, records in order. For small
    runs and tests: at market rates this is what RELEASE_DTYPE exists to avoid."""
    recs = rel.records
    src, offset = message_offsets(recs["count"])
    rows = np.zeros(len(src), dtype=DELIVERY_DTYPE)
    if len(src) == 0:
        return rows
    names = np.array([*rel.endpoints, ""])
    parents = np.array([*rel.parents, ""])
    ep = recs["endpoint"].astype(np.intp)
    pidx = recs["parent"].astype(np.intp)
    ep = np.where(ep < len(rel.endpoints), ep, len(rel.endpoints))
    pidx = np.where(pidx < len(rel.parents), pidx, len(rel.parents))
    rows["endpoint"] = names[ep][src]
    rows["parent"] = parents[pidx][src]
    rows["seq"] = recs["seq"][src] + offset.astype(np.uint64)
    for name in ("stream_id", "session", "arrival_ns", "release_ns", "deadline_ns", "synced"):
        rows[name] = recs[name][src]
    return rows


def concat_releases(parts: Sequence[Releases]) -> Releases:
    """One Releases of many (one per receiver host): name tables merged, indices remapped."""
    if len(parts) == 1:
        return parts[0]
    endpoints: dict[str, int] = {}
    parents: dict[str, int] = {}
    out = []
    for part in parts:
        recs = part.records.copy()
        ep_map = np.array([endpoints.setdefault(n, len(endpoints)) for n in part.endpoints])
        p_map = np.array(
            [parents.setdefault(n, len(parents)) for n in part.parents] + [NO_PARENT],
            dtype=np.int64,
        )
        if len(recs):
            if len(part.endpoints) == 0 or int(recs["endpoint"].max()) >= len(part.endpoints):
                raise ValueError("a record's endpoint index is beyond its name table")
            recs["endpoint"] = ep_map[recs["endpoint"]]
            p = recs["parent"].astype(np.int64)
            recs["parent"] = p_map[np.where(p < len(part.parents), p, len(part.parents))]
        out.append(recs)
    records = np.concatenate(out) if out else np.zeros(0, dtype=RELEASE_DTYPE)
    return Releases(records, tuple(endpoints), tuple(parents))


def releases_within(rel: Releases, sent: npt.NDArray[Any]) -> Releases:
    """The records cut to the seq range each session has in `sent` (SENT_DTYPE): a record
    reaching past either end keeps only its messages inside, one wholly outside is dropped,
    and so is any record of a session `sent` lacks."""
    recs = rel.records
    keep = np.zeros(len(recs), dtype=bool)
    first = recs["seq"].copy()
    last = recs["seq"] + recs["count"].astype(np.uint64) - np.uint64(1)
    for session in np.unique(sent["session"]):
        seqs = sent["seq"][sent["session"] == session]
        lo, hi = seqs.min(), seqs.max()
        mine = (recs["session"] == session) & (recs["count"] > 0)
        first[mine] = np.maximum(first[mine], lo)
        last[mine] = np.minimum(last[mine], hi)
        keep |= mine & (first <= last)
    out = recs[keep].copy()
    out["seq"] = first[keep]
    out["count"] = (last[keep] - first[keep] + np.uint64(1)).astype(np.uint16)
    return Releases(out, rel.endpoints, rel.parents)
