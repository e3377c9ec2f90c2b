"""Fairness metrics (OML, DWS, P(F), lateness, loss, release error) from ground-truth records."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from jasper.records import DELIVERY_DTYPE, SENT_DTYPE

PERCENTILES = (50.0, 99.0, 99.9)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for z=1.96); (0, 1) when n == 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Distribution:
    """Summary of a sample in nanoseconds."""

    n: int
    """Number of values."""
    mean: float | None
    p50: float | None
    p99: float | None
    p999: float | None
    max: float | None

    @staticmethod
    def of(values: npt.ArrayLike) -> Distribution:
        arr = np.asarray(values, dtype=np.float64)
        if arr.size == 0:
            return Distribution(0, None, None, None, None, None)
        p50, p99, p999 = (float(x) for x in np.percentile(arr, PERCENTILES))
        return Distribution(int(arr.size), float(arr.mean()), p50, p99, p999, float(arr.max()))

    def us(self, attr: str) -> str:
        value = getattr(self, attr)
        return "-" if value is None else f"{value / 1000:.1f}"


@dataclass(frozen=True)
class FairnessReport:
    """Fairness of one run (or one configuration of a run), computed from records only."""

    tau_ns: int
    """DWS threshold for a message to count as fair."""
    messages: int
    """Messages in the expected set (publisher log, after warm-up)."""
    endpoints: int
    """Distinct subscribed endpoints."""
    expected_pairs: int
    """Sum over messages of the endpoints subscribed to the message's stream."""
    delivered_pairs: int
    """Expected pairs with a delivery record."""
    lost_pairs: int
    """Expected pairs with no delivery record."""
    late_pairs: int
    """Pairs whose first copy arrived after the deadline."""
    unsynced_pairs: int
    """Pairs released while the receiver's clock was not synchronized."""
    unexpected_records: int
    """Delivery records matching no expected pair (wrong stream, unsubscribed endpoint...)."""
    repeated_records: int
    """Second and later records of one pair: a pair delivered twice (must be 0)."""
    fair_messages: int
    """Messages with no lost or late endpoint and DWS <= tau."""
    p_fair: float | None
    """fair_messages / messages."""
    p_fair_ci: tuple[float, float]
    """Wilson 95% interval of p_fair."""
    oml_ns: Distribution
    """Overall multicast latency per message (slowest endpoint's first arrival − send)."""
    dws_ns: Distribution
    """Delivery window size per message (latest − earliest release), messages with no loss."""
    release_error_ns: Distribution
    """Release time − deadline over on-time pairs."""
    owd_ns: Distribution
    """First arrival − send time over delivered pairs."""
    late_fraction: float | None
    """late_pairs / expected_pairs."""
    lost_fraction: float | None
    """lost_pairs / expected_pairs."""
    warmup_messages: int = 0
    """Messages excluded at the start of each stream."""
    per_endpoint_late: dict[str, int] = field(default_factory=dict)
    """Late pairs per endpoint (only endpoints with at least one)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["p_fair_ci"] = list(self.p_fair_ci)
        return d

    def format_text(self) -> str:
        pf = "-" if self.p_fair is None else f"{100 * self.p_fair:.1f}%"
        lo, hi = self.p_fair_ci
        late = "-" if self.late_fraction is None else f"{100 * self.late_fraction:.3f}%"
        lines = [
            f"messages {self.messages} (warm-up {self.warmup_messages} excluded), "
            f"endpoints {self.endpoints}, expected pairs {self.expected_pairs}",
            f"P(F) {pf}  [95% CI {100 * lo:.1f}–{100 * hi:.1f}%]  tau={self.tau_ns / 1000:g} µs "
            f"n={self.messages}",
            f"OML µs            p50 {self.oml_ns.us('p50')}  p99 {self.oml_ns.us('p99')}  "
            f"max {self.oml_ns.us('max')}",
            f"DWS µs            p50 {self.dws_ns.us('p50')}  p99 {self.dws_ns.us('p99')}  "
            f"max {self.dws_ns.us('max')}",
            f"release error µs  p50 {self.release_error_ns.us('p50')}  "
            f"p99 {self.release_error_ns.us('p99')}  p99.9 {self.release_error_ns.us('p999')}  "
            f"max {self.release_error_ns.us('max')}",
            f"late pairs {self.late_pairs} ({late})  lost pairs {self.lost_pairs}  "
            f"unsynced {self.unsynced_pairs}  repeated {self.repeated_records}  "
            f"unexpected {self.unexpected_records}",
        ]
        return "\n".join(lines)


def fairness_report(
    sent: npt.NDArray[Any],
    deliveries: npt.NDArray[Any],
    subscriptions: Mapping[int, Sequence[str]],
    *,
    tau_ns: int = 0,
    warmup_messages: int = 0,
) -> FairnessReport:
    """Compute the report. The expected set is the publisher's log times the subscriptions.

    `sent` has SENT_DTYPE, `deliveries` DELIVERY_DTYPE. The first `warmup_messages` messages of
    each stream (in send order) are excluded, and so are their delivery records.
    """
    if sent.dtype != SENT_DTYPE:
        raise ValueError("sent must have SENT_DTYPE")
    if deliveries.dtype != DELIVERY_DTYPE:
        raise ValueError("deliveries must have DELIVERY_DTYPE")
    if tau_ns < 0 or warmup_messages < 0:
        raise ValueError("tau_ns and warmup_messages must be >= 0")

    oml: list[npt.NDArray[np.float64]] = []
    dws: list[npt.NDArray[np.float64]] = []
    rel_err: list[npt.NDArray[np.float64]] = []
    owd: list[npt.NDArray[np.float64]] = []
    messages = expected = delivered = lost = late = unsynced = repeated = fair = 0
    matched_records = 0
    per_endpoint_late: dict[str, int] = {}
    all_endpoints: set[str] = set()

    for stream_id, endpoints in sorted(subscriptions.items()):
        names = sorted(set(endpoints))
        all_endpoints.update(names)
        rows = sent[sent["stream_id"] == stream_id]
        rows_all = rows[np.argsort(rows["send_time_ns"], kind="stable")]
        warm = min(warmup_messages, len(rows_all))
        rows = rows_all[warm:]
        m, e = len(rows), len(names)
        if m == 0:
            continue
        messages += m
        expected += m * e
        if e == 0:
            fair += m
            continue
        # Index messages by (session, seq) and endpoints by name.
        recs = deliveries[deliveries["stream_id"] == stream_id]
        i_idx, j_idx = _locate(rows_all, names, recs)
        ok = (i_idx >= 0) & (j_idx >= 0)
        # Records of warm-up messages are neither expected nor unexpected.
        matched_records += int(ok.sum())
        ok &= i_idx >= warm
        i_idx, j_idx, recs = i_idx[ok] - warm, j_idx[ok], recs[ok]
        # Keep the earliest-arriving record of each pair; count the rest as repeated.
        order = np.lexsort((recs["arrival_ns"], j_idx, i_idx))
        i_idx, j_idx, recs = i_idx[order], j_idx[order], recs[order]
        first = np.ones(len(recs), dtype=bool)
        first[1:] = (i_idx[1:] != i_idx[:-1]) | (j_idx[1:] != j_idx[:-1])
        repeated += int((~first).sum())
        i_idx, j_idx, recs = i_idx[first], j_idx[first], recs[first]
        arrival = np.full((m, e), -1, dtype=np.int64)
        release = np.full((m, e), -1, dtype=np.int64)
        synced = np.ones((m, e), dtype=bool)
        arrival[i_idx, j_idx] = recs["arrival_ns"]
        release[i_idx, j_idx] = recs["release_ns"]
        synced[i_idx, j_idx] = recs["synced"]
        send = rows["send_time_ns"].astype(np.int64)[:, None]
        deadline = rows["deadline_ns"].astype(np.int64)[:, None]
        got = arrival >= 0
        is_late = got & (arrival > deadline)
        delivered += int(got.sum())
        lost += int((~got).sum())
        late += int(is_late.sum())
        unsynced += int((got & ~synced).sum())
        for col in np.nonzero(is_late.any(axis=0))[0]:
            per_endpoint_late[names[int(col)]] = int(is_late[:, col].sum())
        owd.append((arrival - send)[got].astype(np.float64))
        on_time = got & ~is_late
        rel_err.append((release - deadline)[on_time].astype(np.float64))
        complete = got.all(axis=1)
        if complete.any():
            oml.append((arrival[complete] - send[complete]).max(axis=1).astype(np.float64))
            r = release[complete]
            window = (r.max(axis=1) - r.min(axis=1)).astype(np.float64)
            dws.append(window)
            no_late = ~is_late[complete].any(axis=1)
            fair += int((no_late & (window <= tau_ns)).sum())

    unexpected = len(deliveries) - matched_records

    def cat(parts: list[npt.NDArray[np.float64]]) -> npt.NDArray[np.float64]:
        return np.concatenate(parts) if parts else np.zeros(0)

    return FairnessReport(
        tau_ns=tau_ns,
        messages=messages,
        endpoints=len(all_endpoints),
        expected_pairs=expected,
        delivered_pairs=delivered,
        lost_pairs=lost,
        late_pairs=late,
        unsynced_pairs=unsynced,
        unexpected_records=unexpected,
        repeated_records=repeated,
        fair_messages=fair,
        p_fair=fair / messages if messages else None,
        p_fair_ci=wilson_interval(fair, messages),
        oml_ns=Distribution.of(cat(oml)),
        dws_ns=Distribution.of(cat(dws)),
        release_error_ns=Distribution.of(cat(rel_err)),
        owd_ns=Distribution.of(cat(owd)),
        late_fraction=late / expected if expected else None,
        lost_fraction=lost / expected if expected else None,
        warmup_messages=warmup_messages,
        per_endpoint_late=per_endpoint_late,
    )


def _locate(
    rows: npt.NDArray[Any], names: Sequence[str], recs: npt.NDArray[Any]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Row index into `rows` (message) and column index into `names` (endpoint) of each record;
    -1 where a record matches no expected message or endpoint."""
    # Messages: sort the expected (session, seq) keys and binary-search the records' keys.
    order = np.lexsort((rows["seq"], rows["session"]))
    s_sess, s_seq = rows["session"][order], rows["seq"][order]
    lo = np.searchsorted(s_sess, recs["session"], side="left")
    hi = np.searchsorted(s_sess, recs["session"], side="right")
    i_idx = np.full(len(recs), -1, dtype=np.int64)
    for sess in np.unique(recs["session"]):
        sel = np.nonzero(recs["session"] == sess)[0]
        a, b = int(lo[sel[0]]), int(hi[sel[0]])
        if a == b:
            continue
        pos = np.searchsorted(s_seq[a:b], recs["seq"][sel])
        pos_c = np.minimum(pos, b - a - 1)
        hit = s_seq[a:b][pos_c] == recs["seq"][sel]
        i_idx[sel[hit]] = order[a + pos_c[hit]]
    # Endpoints: map each distinct name once.
    ep_index = {name: j for j, name in enumerate(names)}
    uniq, inverse = np.unique(recs["endpoint"], return_inverse=True)
    lookup = np.array([ep_index.get(str(u), -1) for u in uniq], dtype=np.int64)
    j_idx = lookup[inverse] if len(recs) else np.zeros(0, dtype=np.int64)
    return i_idx, j_idx
