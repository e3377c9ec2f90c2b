"""Fairness metrics (OML, DWS, P(F), lateness, loss, release error) from ground-truth records."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from jasper.records import (
    DELIVERY_DTYPE,
    SENT_DTYPE,
    Releases,
    message_offsets,
    releases_from_deliveries,
)

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


@dataclass(frozen=True)
class PairMatrices:
    """Messages × endpoints of one stream, built from release records: the first record of each
    pair (earliest arrival) fills its cell."""

    arrival_ns: npt.NDArray[np.int64]
    """(m, e) first accepted arrival (kernel clock), -1 when lost."""
    release_ns: npt.NDArray[np.int64]
    """(m, e) release time, -1 when lost."""
    synced: npt.NDArray[np.bool_]
    """(m, e) clock synchronized at release (True where lost)."""
    matched: int
    """Pairs (messages × endpoints the records stand for) that name an expected message and
    endpoint, including messages skipped at the start."""
    repeated: int
    """Second and later records of one pair (skipped messages excluded)."""


PAIR_CHUNK = 1 << 20
"""Pairs expanded at a time from the records: bounds what locating them costs in memory."""


def pair_matrices(
    rows: npt.NDArray[Any],
    names: Sequence[str],
    releases: Releases,
    *,
    skip: int = 0,
    chunk_pairs: int = PAIR_CHUNK,
) -> PairMatrices:
    """Cells for messages `rows[skip:]` (SENT_DTYPE, in the order the rows come) × `names`.

    Each record stands for `count` messages seq .. seq + count - 1 at one endpoint; they are
    located from record indices repeated `count` times, about `chunk_pairs` pairs at a time, so
    no per-message row is ever built. Records of other streams must be filtered out by the caller.
    """
    m, e = len(rows) - skip, len(names)
    arrival = np.full((m, e), -1, dtype=np.int64)
    release = np.full((m, e), -1, dtype=np.int64)
    synced = np.ones((m, e), dtype=bool)
    recs = releases.records
    if m <= 0 or e == 0 or len(recs) == 0:
        return PairMatrices(arrival, release, synced, 0, 0)
    # Endpoint columns per record, from the name table (one lookup per name).
    col = {name: j for j, name in enumerate(names)}
    table = np.array([col.get(n, -1) for n in releases.endpoints] + [-1], dtype=np.int64)
    ep = recs["endpoint"].astype(np.int64)
    j_rec = table[np.where(ep < len(releases.endpoints), ep, len(releases.endpoints))]
    keys = _SortedKeys(rows)
    p0 = keys.position(recs["session"], recs["seq"])
    filled = np.zeros(m * e, dtype=bool)
    a_flat, r_flat, s_flat = arrival.reshape(-1), release.reshape(-1), synced.reshape(-1)
    matched = kept = 0
    ends = np.cumsum(recs["count"], dtype=np.int64)
    lo = 0
    while lo < len(recs):
        # Whole records, about chunk_pairs pairs (a larger record goes alone).
        done = int(ends[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, done + chunk_pairs, side="right")))
        src, offset = message_offsets(recs["count"][lo:hi])
        src += lo
        i_idx = keys.locate(
            recs["session"][src], recs["seq"][src] + offset.astype(np.uint64), p0[src] + offset
        )
        del offset
        j_idx = j_rec[src]
        ok = (i_idx >= 0) & (j_idx >= 0)
        matched += int(ok.sum())
        ok &= i_idx >= skip
        src = src[ok]
        flat = (i_idx[ok] - skip) * e + j_idx[ok]
        del i_idx, j_idx, ok
        kept += len(flat)
        # The earliest-arriving record of each pair, the first of equals in record order:
        # within the chunk by sorting, against earlier chunks by a strictly earlier arrival.
        at = recs["arrival_ns"][src]
        order = np.lexsort((at, flat))
        flat, src, at = flat[order], src[order], at[order]
        first = np.ones(len(flat), dtype=bool)
        first[1:] = flat[1:] != flat[:-1]
        flat, src, at = flat[first], src[first], at[first]
        take = ~filled[flat] | (at < a_flat[flat])
        flat, src = flat[take], src[take]
        filled[flat] = True
        a_flat[flat] = at[take]
        r_flat[flat] = recs["release_ns"][src]
        s_flat[flat] = recs["synced"][src]
        lo = hi
    repeated = kept - int(np.count_nonzero(filled))
    return PairMatrices(arrival, release, synced, matched, repeated)


class _SortedKeys:
    """The (session, seq) keys of SENT_DTYPE rows, sorted, to find messages' row indices."""

    def __init__(self, rows: npt.NDArray[Any]) -> None:
        self.order = np.lexsort((rows["seq"], rows["session"]))
        self.session = rows["session"][self.order]
        self.seq = rows["seq"][self.order]

    def position(self, session: npt.NDArray[Any], seq: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """Where each (session, seq) is or would go in the sorted keys; -1 for a session the
        rows lack."""
        pos = np.full(len(seq), -1, dtype=np.int64)
        for sess in np.unique(self.session):
            a = int(np.searchsorted(self.session, sess, side="left"))
            b = int(np.searchsorted(self.session, sess, side="right"))
            sel = np.nonzero(session == sess)[0]
            pos[sel] = a + np.searchsorted(self.seq[a:b], seq[sel])
        return pos

    def locate(
        self, session: npt.NDArray[Any], seq: npt.NDArray[Any], guess: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """Row index of each (session, seq) message, -1 where no row has it; `guess` is where
        it is when the sent keys run without a gap (checked, and searched where wrong)."""
        n = len(self.seq)
        g = np.clip(guess, 0, n - 1)
        hit = (guess >= 0) & (self.session[g] == session) & (self.seq[g] == seq)
        i_idx = np.where(hit, self.order[g], -1)
        miss = np.nonzero(~hit)[0]
        if len(miss):
            pos = self.position(session[miss], seq[miss])
            pc = np.clip(pos, 0, n - 1)
            found = (pos >= 0) & (self.session[pc] == session[miss]) & (self.seq[pc] == seq[miss])
            i_idx[miss[found]] = self.order[pc[found]]
        return i_idx


def fairness_report(
    sent: npt.NDArray[Any],
    deliveries: npt.NDArray[Any] | Releases,
    subscriptions: Mapping[int, Sequence[str]],
    *,
    tau_ns: int = 0,
    warmup_messages: int = 0,
) -> FairnessReport:
    """Compute the report. The expected set is the publisher's log times the subscriptions.

    `sent` has SENT_DTYPE; `deliveries` is either DELIVERY_DTYPE rows (one per message and
    endpoint) or Releases (one record per datagram and endpoint, standing for `count`
    consecutive messages): both give the same report. The first `warmup_messages` messages of
    each stream (in send order) are excluded, and so are their delivery records.
    """
    return fairness_reports(
        sent, deliveries, subscriptions, taus_ns=(tau_ns,), warmup_messages=warmup_messages
    )[0]


def fairness_reports(
    sent: npt.NDArray[Any],
    deliveries: npt.NDArray[Any] | Releases,
    subscriptions: Mapping[int, Sequence[str]],
    *,
    taus_ns: Sequence[int],
    warmup_messages: int = 0,
) -> list[FairnessReport]:
    """`fairness_report` at each of `taus_ns`, the pair matrices built once."""
    return fairness_analysis(
        sent, deliveries, subscriptions, taus_ns=taus_ns, warmup_messages=warmup_messages
    )[0]


FIGURE_QUANTILES = 401
"""Points of each distribution kept for a report's CDF plots (exact order statistics of all
values, so a plot's size does not grow with the run)."""

FIGURE_BINS = 120
"""Time bins of a report's over-time plots (their width follows the run's length)."""


@dataclass(frozen=True)
class Quantiles:
    """A distribution for plotting: `values_ns[k]` is the order statistic at probability
    `k / (len - 1)` of all `n` values (rank rounded to the nearest)."""

    n: int
    """How many values the distribution has (all of them, not only the points kept)."""
    values_ns: tuple[float, ...]
    """FIGURE_QUANTILES order statistics (empty when n == 0), in nanoseconds."""

    @staticmethod
    def of_sorted(values: npt.NDArray[np.float64], points: int = FIGURE_QUANTILES) -> Quantiles:
        n = len(values)
        if n == 0:
            return Quantiles(0, ())
        idx = np.rint(np.linspace(0, n - 1, points)).astype(np.int64)
        return Quantiles(n, tuple(float(x) for x in values[idx]))


@dataclass(frozen=True)
class TimeBins:
    """Per-message outcomes over send time, summed in FIGURE_BINS equal bins."""

    t0_ns: int
    """Send time of the first scored message; bin k covers t0 + k·bin_ns .. + bin_ns."""
    bin_ns: int
    """Width of a bin in nanoseconds."""
    messages: tuple[int, ...]
    """Messages sent in each bin."""
    expected_pairs: tuple[int, ...]
    late_pairs: tuple[int, ...]
    lost_pairs: tuple[int, ...]
    hold_min_ns: tuple[float | None, ...]
    """Least stamped hold (deadline − send time) in each bin; None where nothing was sent."""
    hold_mean_ns: tuple[float | None, ...]
    hold_max_ns: tuple[float | None, ...]


@dataclass(frozen=True)
class FairnessFigures:
    """What a report plots, computed in the same pass as the FairnessReport and bounded in
    size whatever the run's length or rate."""

    oml: Quantiles
    """OML per message (messages delivered everywhere)."""
    dws: Quantiles
    """DWS per message (messages delivered everywhere)."""
    release_error: Quantiles
    """Release time − deadline over on-time pairs."""
    over_time: TimeBins

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _time_bins(sent: npt.NDArray[Any], bins: int) -> tuple[int, int]:
    """(t0, width) of `bins` bins covering every send time of `sent` (width >= 1 ns)."""
    if len(sent) == 0:
        return 0, 1
    t = sent["send_time_ns"].astype(np.int64)
    t0, span = int(t.min()), int(t.max()) - int(t.min())
    return t0, max(1, span // bins + 1)


def fairness_analysis(
    sent: npt.NDArray[Any],
    deliveries: npt.NDArray[Any] | Releases,
    subscriptions: Mapping[int, Sequence[str]],
    *,
    taus_ns: Sequence[int],
    warmup_messages: int = 0,
) -> tuple[list[FairnessReport], FairnessFigures]:
    """`fairness_reports` and the figures of its distributions and of lateness, loss and the
    stamped hold over time, from one pass over the pair matrices."""
    if sent.dtype != SENT_DTYPE:
        raise ValueError("sent must have SENT_DTYPE")
    if isinstance(deliveries, Releases):
        releases = deliveries
    elif deliveries.dtype == DELIVERY_DTYPE:
        releases = releases_from_deliveries(deliveries)
    else:
        raise ValueError("deliveries must have DELIVERY_DTYPE or be Releases")
    if any(t < 0 for t in taus_ns) or warmup_messages < 0:
        raise ValueError("tau_ns and warmup_messages must be >= 0")

    oml: list[npt.NDArray[np.float64]] = []
    dws: list[npt.NDArray[np.float64]] = []
    rel_err: list[npt.NDArray[np.float64]] = []
    owd: list[npt.NDArray[np.float64]] = []
    messages = expected = delivered = lost = late = unsynced = repeated = 0
    fair = [0] * len(taus_ns)
    matched_records = 0
    per_endpoint_late: dict[str, int] = {}
    all_endpoints: set[str] = set()
    scored = [
        _scored_rows(sent[sent["stream_id"] == sid], warmup_messages) for sid in subscriptions
    ]
    t0, bin_ns = _time_bins(np.concatenate(scored) if scored else sent[:0], FIGURE_BINS)
    bin_msgs = np.zeros(FIGURE_BINS, dtype=np.int64)
    bin_expected = np.zeros(FIGURE_BINS, dtype=np.int64)
    bin_late = np.zeros(FIGURE_BINS, dtype=np.int64)
    bin_lost = np.zeros(FIGURE_BINS, dtype=np.int64)
    hold_sum = np.zeros(FIGURE_BINS, dtype=np.float64)
    hold_min = np.full(FIGURE_BINS, np.inf)
    hold_max = np.full(FIGURE_BINS, -np.inf)

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
        in_bin = (rows["send_time_ns"].astype(np.int64) - t0) // bin_ns
        hold = (
            rows["deadline_ns"].astype(np.int64) - rows["send_time_ns"].astype(np.int64)
        ).astype(np.float64)
        bin_msgs += np.bincount(in_bin, minlength=FIGURE_BINS)
        bin_expected += e * np.bincount(in_bin, minlength=FIGURE_BINS)
        hold_sum += np.bincount(in_bin, weights=hold, minlength=FIGURE_BINS)
        np.minimum.at(hold_min, in_bin, hold)
        np.maximum.at(hold_max, in_bin, hold)
        if e == 0:
            fair = [f + m for f in fair]
            continue
        # Records of warm-up messages are neither expected nor unexpected.
        mats = pair_matrices(
            rows_all,
            names,
            releases.select(releases.records["stream_id"] == stream_id),
            skip=warm,
        )
        matched_records += mats.matched
        repeated += mats.repeated
        arrival, release = mats.arrival_ns, mats.release_ns
        send = rows["send_time_ns"].astype(np.int64)[:, None]
        deadline = rows["deadline_ns"].astype(np.int64)[:, None]
        got = arrival >= 0
        is_late = got & (arrival > deadline)
        delivered += int(got.sum())
        lost += int((~got).sum())
        late += int(is_late.sum())
        bin_late += np.bincount(in_bin, weights=is_late.sum(axis=1), minlength=FIGURE_BINS).astype(
            np.int64
        )
        bin_lost += np.bincount(in_bin, weights=(~got).sum(axis=1), minlength=FIGURE_BINS).astype(
            np.int64
        )
        unsynced += int((got & ~mats.synced).sum())
        del mats
        for col in np.nonzero(is_late.any(axis=0))[0]:
            per_endpoint_late[names[int(col)]] = int(is_late[:, col].sum())
        # In place, the matrices being ours: arrival becomes the delay from the send, release
        # the release error (one deadline per row leaves each row's spread as it was).
        arrival -= send
        release -= deadline
        owd.append(arrival[got].astype(np.float64))
        on_time = got & ~is_late
        rel_err.append(release[on_time].astype(np.float64))
        del on_time
        complete = got.all(axis=1)
        if complete.any():
            oml.append(arrival[complete].max(axis=1).astype(np.float64))
            r = release[complete]
            window = (r.max(axis=1) - r.min(axis=1)).astype(np.float64)
            dws.append(window)
            no_late = ~is_late[complete].any(axis=1)
            for k, tau in enumerate(taus_ns):
                fair[k] += int((no_late & (window <= tau)).sum())

    unexpected = releases.messages - matched_records

    def cat(parts: list[npt.NDArray[np.float64]]) -> npt.NDArray[np.float64]:
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0)

    # Sorted in place once the summary is taken: the arrays are ours and not needed after.
    figures_q = []
    dists = []
    for parts in (oml, dws, rel_err):
        values = cat(parts)
        dists.append(Distribution.of(values))
        values.sort()
        figures_q.append(Quantiles.of_sorted(values))
        del values
    oml_d, dws_d, rel_d = dists
    owd_d = Distribution.of(cat(owd))
    sent_any = bin_msgs > 0

    def per_bin(x: npt.NDArray[np.float64]) -> tuple[float | None, ...]:
        return tuple(float(v) if ok else None for v, ok in zip(x, sent_any, strict=True))

    figures = FairnessFigures(
        oml=figures_q[0],
        dws=figures_q[1],
        release_error=figures_q[2],
        over_time=TimeBins(
            t0_ns=t0,
            bin_ns=bin_ns,
            messages=tuple(int(x) for x in bin_msgs),
            expected_pairs=tuple(int(x) for x in bin_expected),
            late_pairs=tuple(int(x) for x in bin_late),
            lost_pairs=tuple(int(x) for x in bin_lost),
            hold_min_ns=per_bin(hold_min),
            hold_mean_ns=per_bin(hold_sum / np.maximum(1, bin_msgs)),
            hold_max_ns=per_bin(hold_max),
        ),
    )
    reports = [
        FairnessReport(
            tau_ns=tau,
            messages=messages,
            endpoints=len(all_endpoints),
            expected_pairs=expected,
            delivered_pairs=delivered,
            lost_pairs=lost,
            late_pairs=late,
            unsynced_pairs=unsynced,
            unexpected_records=unexpected,
            repeated_records=repeated,
            fair_messages=fair_k,
            p_fair=fair_k / messages if messages else None,
            p_fair_ci=wilson_interval(fair_k, messages),
            oml_ns=oml_d,
            dws_ns=dws_d,
            release_error_ns=rel_d,
            owd_ns=owd_d,
            late_fraction=late / expected if expected else None,
            lost_fraction=lost / expected if expected else None,
            warmup_messages=warmup_messages,
            per_endpoint_late=dict(per_endpoint_late),
        )
        for tau, fair_k in zip(taus_ns, fair, strict=True)
    ]
    return reports, figures


def _scored_rows(rows: npt.NDArray[Any], warmup_messages: int) -> npt.NDArray[Any]:
    """A stream's messages in send order without its first `warmup_messages`."""
    rows = rows[np.argsort(rows["send_time_ns"], kind="stable")]
    return rows[min(warmup_messages, len(rows)) :]
