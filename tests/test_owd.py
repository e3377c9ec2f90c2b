"""Streaming one-way-delay percentiles: accuracy, windows, bounded memory, max-reduce."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jasper.owd import (
    HISTOGRAM_BUCKETS,
    MAX_TRACKED_NS,
    OwdReport,
    OwdTracker,
    OwdWindow,
    bucket_index,
    bucket_upper_ns,
    max_reduce,
)


@given(st.integers(0, MAX_TRACKED_NS))
def test_bucket_holds_value_within_one_sixty_fourth(v: int) -> None:
    i = bucket_index(v)
    assert 0 <= i < HISTOGRAM_BUCKETS
    upper = bucket_upper_ns(i)
    assert v <= upper <= v + v / 64
    if i > 0:
        assert bucket_upper_ns(i - 1) < v


def test_percentiles_match_numpy_within_bucket_precision() -> None:
    rng = np.random.default_rng(7)
    delays = (rng.lognormal(np.log(100_000), 0.3, 5_000)).astype(np.int64)
    w = OwdWindow(start_ns=0)
    for d in delays.tolist():
        w.record(d, late=False)
    p50, p95, p97, p99 = w.percentiles()
    for got, q in ((p50, 50), (p95, 95), (p97, 97), (p99, 99)):
        exact = float(np.percentile(delays, q, method="inverted_cdf"))
        assert exact <= got <= exact * (1 + 1 / 64), q


def test_window_closes_on_count_and_reports_lateness() -> None:
    t = OwdTracker(stream_id=3, window_samples=100, window_ns=10**12)
    out = []
    for i in range(250):
        send = i * 1_000_000
        arrival = send + 100_000 + (i % 10) * 1_000
        deadline = send + 108_000  # the 9 µs arrivals are late
        r = t.record(send_ns=send, arrival_ns=arrival, deadline_ns=deadline, now_ns=arrival)
        if r is not None:
            out.append(r)
    assert [r.count for r in out] == [100, 100]
    r = out[0]
    assert r.stream_id == 3
    assert r.late == 10
    assert r.late_fraction == pytest.approx(0.1)
    assert r.worst_late_fraction == pytest.approx(0.1)
    assert r.p50_ns == pytest.approx(104_000, rel=1 / 64)
    assert r.max_ns == 109_000
    assert r.p99_ns == 109_000


def test_window_closes_on_time_and_empty_windows_say_nothing() -> None:
    t = OwdTracker(stream_id=1, window_samples=1_000, window_ns=100_000_000)
    assert t.poll(10**9) is None
    t.record(send_ns=0, arrival_ns=50_000, deadline_ns=0, now_ns=0)
    assert t.poll(50_000_000) is None
    r = t.poll(100_000_000)
    assert r is not None and r.count == 1 and r.late == 0  # deadline 0 = deliver at once
    assert t.poll(300_000_000) is None


def test_negative_delays_are_counted_not_lost() -> None:
    w = OwdWindow(start_ns=0)
    w.record(-5_000, late=False)
    w.record(10_000, late=False)
    r = w.report(stream_id=1, end_ns=1)
    assert r.negative == 1 and r.count == 2 and r.p50_ns == 0 and r.max_ns == 10_000


def test_memory_is_bounded_whatever_the_spread() -> None:
    rng = np.random.default_rng(1)
    w = OwdWindow(start_ns=0)
    for v in rng.integers(0, MAX_TRACKED_NS * 4, 20_000).tolist():
        w.record(v, late=False)
    assert len(w.counts) <= HISTOGRAM_BUCKETS
    assert w.count == 20_000


def _report(stream: int, p97: int, late: int, count: int = 100) -> OwdReport:
    return OwdReport(
        stream_id=stream, start_ns=0, end_ns=1, count=count, late=late, p50_ns=p97 // 2,
        p95_ns=p97 - 1, p97_ns=p97, p99_ns=p97 + 1, max_ns=p97 + 2,
        worst_late_fraction=late / count,
    )  # fmt: skip


def test_max_reduce_takes_the_slowest_endpoint() -> None:
    a, b, c = _report(1, 100_000, 1), _report(1, 300_000, 5), _report(1, 200_000, 0)
    r = max_reduce([a, b, c])
    assert r.p97_ns == 300_000 and r.p50_ns == 150_000 and r.max_ns == 300_002
    assert r.count == 300 and r.late == 6
    assert r.worst_late_fraction == pytest.approx(0.05)
    assert r.reporters == 3
    # Reduction is associative, so relays can reduce in any grouping.
    assert max_reduce([max_reduce([a, b]), c]) == r
    assert OwdReport.from_dict(r.as_dict()) == r
    with pytest.raises(ValueError):
        max_reduce([a, _report(2, 1, 0)])
    with pytest.raises(ValueError):
        max_reduce([])


def test_collector_reduces_per_stream_and_bounds_pending() -> None:
    from jasper.owd import OwdCollector

    c = OwdCollector(window_samples=10, window_ns=10**12, max_pending=3)
    for ep, delay in ((0, 100_000), (1, 250_000)):
        for i in range(10):
            c.record(endpoint=ep, stream_id=1, send_ns=i, arrival_ns=i + delay,
                     deadline_ns=i + 200_000, now_ns=i + delay)  # fmt: skip
    (r,) = c.drain(10**6)
    assert r.reporters == 2 and r.count == 20 and r.late == 10
    assert r.p97_ns == pytest.approx(250_000, rel=1 / 64)
    assert r.worst_late_fraction == 1.0
    assert c.drain(10**6) == []
    for ep in range(5):
        for i in range(10):
            c.record(endpoint=ep, stream_id=2, send_ns=i, arrival_ns=i + 1,
                     deadline_ns=0, now_ns=i)  # fmt: skip
    (r2,) = c.drain(10**6)
    assert r2.reporters == 3 and c.dropped_reports == 2


def test_final_drain_closes_open_windows() -> None:
    from jasper.owd import OwdCollector

    c = OwdCollector(window_samples=1_000, window_ns=10**12)
    c.record(endpoint=0, stream_id=1, send_ns=0, arrival_ns=70_000, deadline_ns=0, now_ns=1)
    assert c.drain(2) == []
    (r,) = c.drain(3, close_open=True)
    assert r.count == 1 and r.max_ns == 70_000 and r.end_ns == 3
    with pytest.raises(ValueError):
        OwdTracker(stream_id=1, window_samples=1)
