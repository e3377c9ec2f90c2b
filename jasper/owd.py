"""One-way delay from the root: streaming percentiles over short windows, and their max-reduce.

Each endpoint records, per message, the delay from the root's send time to its arrival on
the endpoint's corrected clock, and whether it arrived after its deadline. A window closes
after `window_samples` messages or `window_ns` of time, whichever comes first, and yields an
`OwdReport`. Memory per stream is one log-linear histogram: at most `HISTOGRAM_BUCKETS`
counters, whatever the rate.

Reports are max-reduced (per percentile, the largest) on their way up, as the Jasper paper
does: the deadline has to cover the slowest endpoint, and a merged histogram would describe
the average endpoint instead, letting the slowest one be late far more often than the
objective.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

SUB_BUCKET_BITS = 6
"""64 sub-buckets per power of two: each bucket spans at most 1/64 (1.6 %) of its value."""
_SUB = 1 << SUB_BUCKET_BITS
MAX_TRACKED_NS = (1 << 40) - 1
"""Delays above ~18 minutes are counted in the top bucket."""
HISTOGRAM_BUCKETS = _SUB + (40 - SUB_BUCKET_BITS) * _SUB
"""Upper bound on the number of counters one window holds."""

PERCENTILES = (0.50, 0.95, 0.97, 0.99)


def bucket_index(value_ns: int) -> int:
    """Log-linear bucket of a delay (values below 64 ns get exact buckets; negatives go to 0)."""
    v = min(max(value_ns, 0), MAX_TRACKED_NS)
    if v < _SUB:
        return v
    shift = v.bit_length() - SUB_BUCKET_BITS - 1
    return _SUB + shift * _SUB + ((v >> shift) - _SUB)


def bucket_upper_ns(index: int) -> int:
    """The largest delay that falls in bucket `index` (reported, so estimates err high)."""
    if index < _SUB:
        return index
    shift, sub = divmod(index - _SUB, _SUB)
    return ((sub + _SUB + 1) << shift) - 1


@dataclass(frozen=True, slots=True)
class OwdReport:
    """Delay percentiles of one window, from one endpoint or max-reduced over many."""

    stream_id: int
    """Stream the delays belong to."""
    start_ns: int
    """Clock reading when the window opened."""
    end_ns: int
    """Clock reading when the window closed."""
    count: int
    """Messages in the window (summed when reduced)."""
    late: int
    """Messages that arrived after their deadline (summed when reduced)."""
    p50_ns: int
    """Median delay, ns (bucket upper edge, capped at the maximum seen)."""
    p95_ns: int
    """95th percentile delay, ns."""
    p97_ns: int
    """97th percentile delay, ns."""
    p99_ns: int
    """99th percentile delay, ns."""
    max_ns: int
    """Largest delay, ns."""
    negative: int = 0
    """Delays below zero (a clock error larger than the delay; counted as 0)."""
    worst_late_fraction: float = 0.0
    """Largest late fraction of any one contributing endpoint."""
    reporters: int = 1
    """How many endpoint reports this one stands for."""

    @property
    def late_fraction(self) -> float:
        """Late messages over all messages in the window."""
        return self.late / self.count if self.count else 0.0

    def percentile_ns(self, name: str) -> int:
        """A percentile by its name: "p50", "p95", "p97", "p99" or "max"."""
        value: int = getattr(self, f"{name}_ns")
        return value

    def as_dict(self) -> dict[str, int | float]:
        """The heartbeat form (JSON-ready)."""
        return {
            "stream_id": self.stream_id,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "count": self.count,
            "late": self.late,
            "p50_ns": self.p50_ns,
            "p95_ns": self.p95_ns,
            "p97_ns": self.p97_ns,
            "p99_ns": self.p99_ns,
            "max_ns": self.max_ns,
            "negative": self.negative,
            "worst_late_fraction": self.worst_late_fraction,
            "reporters": self.reporters,
        }

    @classmethod
    def from_dict(cls, d: dict[str, int | float]) -> OwdReport:
        return cls(
            stream_id=int(d["stream_id"]),
            start_ns=int(d["start_ns"]),
            end_ns=int(d["end_ns"]),
            count=int(d["count"]),
            late=int(d["late"]),
            p50_ns=int(d["p50_ns"]),
            p95_ns=int(d["p95_ns"]),
            p97_ns=int(d["p97_ns"]),
            p99_ns=int(d["p99_ns"]),
            max_ns=int(d["max_ns"]),
            negative=int(d.get("negative", 0)),
            worst_late_fraction=float(d.get("worst_late_fraction", 0.0)),
            reporters=int(d.get("reporters", 1)),
        )


@dataclass
class OwdWindow:
    """The histogram of one open window."""

    start_ns: int
    counts: dict[int, int] = field(default_factory=dict)
    count: int = 0
    late: int = 0
    negative: int = 0
    max_ns: int = 0

    def record(self, owd_ns: int, *, late: bool) -> None:
        i = bucket_index(owd_ns)
        self.counts[i] = self.counts.get(i, 0) + 1
        self.count += 1
        if late:
            self.late += 1
        if owd_ns < 0:
            self.negative += 1
        elif owd_ns > self.max_ns:
            self.max_ns = owd_ns

    def percentiles(self) -> tuple[int, ...]:
        """Nearest-rank percentiles in PERCENTILES order."""
        ranks = [max(1, -(-int(q * 1_000_000) * self.count // 1_000_000)) for q in PERCENTILES]
        out: list[int] = []
        seen = 0
        want = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            while want < len(ranks) and seen >= ranks[want]:
                out.append(min(bucket_upper_ns(i), self.max_ns))
                want += 1
            if want == len(ranks):
                break
        return tuple(out)

    def report(self, *, stream_id: int, end_ns: int) -> OwdReport:
        p50, p95, p97, p99 = self.percentiles()
        return OwdReport(
            stream_id=stream_id,
            start_ns=self.start_ns,
            end_ns=end_ns,
            count=self.count,
            late=self.late,
            p50_ns=p50,
            p95_ns=p95,
            p97_ns=p97,
            p99_ns=p99,
            max_ns=self.max_ns,
            negative=self.negative,
            worst_late_fraction=self.late / self.count,
        )


class OwdTracker:
    """Streaming delay percentiles of one stream at one endpoint, window by window."""

    def __init__(
        self, *, stream_id: int, window_samples: int = 1_000, window_ns: int = 200_000_000
    ) -> None:
        # >= 2: a sample that finds its time-expired window closed opens the next one, and
        # must not close that one too (record returns one report).
        if window_samples < 2:
            raise ValueError(f"window_samples must be >= 2, got {window_samples}")
        if window_ns < 1:
            raise ValueError(f"window_ns must be >= 1, got {window_ns}")
        self.stream_id = stream_id
        self.window_samples = window_samples
        self.window_ns = window_ns
        self._window: OwdWindow | None = None

    def record(
        self, *, send_ns: int, arrival_ns: int, deadline_ns: int, now_ns: int
    ) -> OwdReport | None:
        """Record one message; the report of the window it closed, if it closed one."""
        closed = self.poll(now_ns)
        if self._window is None:
            self._window = OwdWindow(start_ns=now_ns)
        self._window.record(arrival_ns - send_ns, late=0 < deadline_ns < arrival_ns)
        if self._window.count >= self.window_samples:
            report = self._window.report(stream_id=self.stream_id, end_ns=now_ns)
            self._window = None
            return report
        return closed

    def poll(self, now_ns: int) -> OwdReport | None:
        """Close the open window if its time is up (call from a timer); None if nothing closed."""
        w = self._window
        if w is not None and now_ns - w.start_ns >= self.window_ns:
            self._window = None
            return w.report(stream_id=self.stream_id, end_ns=now_ns)
        return None

    def close(self, now_ns: int) -> OwdReport | None:
        """Close the open window whatever its age (shutdown, final report)."""
        w, self._window = self._window, None
        return w.report(stream_id=self.stream_id, end_ns=now_ns) if w is not None else None


def max_reduce(reports: Iterable[OwdReport]) -> OwdReport:
    """Combine reports of one stream: the largest of each percentile, counts summed."""
    items = list(reports)
    if not items:
        raise ValueError("nothing to reduce")
    streams = {r.stream_id for r in items}
    if len(streams) != 1:
        raise ValueError(f"reports of several streams: {sorted(streams)}")
    return OwdReport(
        stream_id=items[0].stream_id,
        start_ns=min(r.start_ns for r in items),
        end_ns=max(r.end_ns for r in items),
        count=sum(r.count for r in items),
        late=sum(r.late for r in items),
        p50_ns=max(r.p50_ns for r in items),
        p95_ns=max(r.p95_ns for r in items),
        p97_ns=max(r.p97_ns for r in items),
        p99_ns=max(r.p99_ns for r in items),
        max_ns=max(r.max_ns for r in items),
        negative=sum(r.negative for r in items),
        worst_late_fraction=max(r.worst_late_fraction for r in items),
        reporters=sum(r.reporters for r in items),
    )


class OwdCollector:
    """All endpoints of one receiver: a tracker per (endpoint, stream), closed windows kept
    until the next heartbeat drains them, max-reduced per stream.

    Memory: one histogram per (endpoint, stream) plus at most `max_pending` closed reports;
    beyond that the oldest are dropped and counted in `dropped_reports`.
    """

    def __init__(
        self,
        *,
        window_samples: int = 1_000,
        window_ns: int = 200_000_000,
        max_pending: int = 4_096,
    ) -> None:
        self.window_samples = window_samples
        self.window_ns = window_ns
        self.max_pending = max_pending
        self.dropped_reports = 0
        self._trackers: dict[tuple[int, int], OwdTracker] = {}
        self._pending: list[OwdReport] = []

    def _keep(self, report: OwdReport | None) -> None:
        if report is None:
            return
        if len(self._pending) >= self.max_pending:
            self._pending.pop(0)
            self.dropped_reports += 1
        self._pending.append(report)

    def record(
        self,
        *,
        endpoint: int,
        stream_id: int,
        send_ns: int,
        arrival_ns: int,
        deadline_ns: int,
        now_ns: int,
    ) -> None:
        """One accepted message at one endpoint; times on the endpoint's corrected clock."""
        key = (endpoint, stream_id)
        t = self._trackers.get(key)
        if t is None:
            t = self._trackers[key] = OwdTracker(
                stream_id=stream_id, window_samples=self.window_samples, window_ns=self.window_ns
            )
        self._keep(
            t.record(send_ns=send_ns, arrival_ns=arrival_ns, deadline_ns=deadline_ns, now_ns=now_ns)
        )

    def poll(self, now_ns: int) -> None:
        """Close windows whose time is up (call before draining)."""
        for t in self._trackers.values():
            self._keep(t.poll(now_ns))

    def drain(self, now_ns: int, *, close_open: bool = False) -> list[OwdReport]:
        """Closed windows since the last drain, max-reduced per stream (one report each).

        `close_open` also closes windows still open (for a final report at shutdown).
        """
        self.poll(now_ns)
        if close_open:
            for t in self._trackers.values():
                self._keep(t.close(now_ns))
        by_stream: dict[int, list[OwdReport]] = {}
        for r in self._pending:
            by_stream.setdefault(r.stream_id, []).append(r)
        self._pending = []
        return [max_reduce(rs) for _, rs in sorted(by_stream.items())]
