"""Fairness metrics computed from hand-made records with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from jasper.metrics import fairness_report, wilson_interval
from jasper.records import empty_deliveries, empty_sent


def make(n_msgs: int, endpoints: list[str], *, hold: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    sent = empty_sent(n_msgs)
    sent["stream_id"] = 1
    sent["session"] = 1
    sent["seq"] = np.arange(1, n_msgs + 1)
    sent["send_time_ns"] = np.arange(n_msgs) * 10_000
    sent["deadline_ns"] = sent["send_time_ns"] + hold
    d = empty_deliveries(n_msgs * len(endpoints))
    k = 0
    for i in range(n_msgs):
        for j, ep in enumerate(endpoints):
            d[k]["endpoint"] = ep
            d[k]["stream_id"] = 1
            d[k]["session"] = 1
            d[k]["seq"] = i + 1
            d[k]["arrival_ns"] = sent[i]["send_time_ns"] + 100 + 10 * j
            d[k]["deadline_ns"] = sent[i]["deadline_ns"]
            d[k]["release_ns"] = sent[i]["deadline_ns"] + j  # endpoint j released j ns late
            d[k]["synced"] = True
            k += 1
    return sent, d


def test_perfect_run() -> None:
    sent, d = make(10, ["e0", "e1", "e2"])
    r = fairness_report(sent, d, {1: ["e0", "e1", "e2"]}, tau_ns=2)
    assert r.messages == 10 and r.expected_pairs == 30 and r.delivered_pairs == 30
    assert r.lost_pairs == 0 and r.late_pairs == 0
    assert r.oml_ns.p50 == 120  # slowest endpoint e2 arrives 120 ns after send
    assert r.dws_ns.max == 2
    assert r.fair_messages == 10 and r.p_fair == 1.0
    assert r.release_error_ns.max == 2 and r.release_error_ns.p50 == 1


def test_tau_decides_fairness() -> None:
    sent, d = make(10, ["e0", "e1", "e2"])
    r = fairness_report(sent, d, {1: ["e0", "e1", "e2"]}, tau_ns=1)
    assert r.fair_messages == 0 and r.p_fair == 0.0


def test_lost_and_late_pairs() -> None:
    sent, d = make(4, ["e0", "e1"])
    d = d[~((d["seq"] == 2) & (d["endpoint"] == "e1"))]  # lost
    late = (d["seq"] == 3) & (d["endpoint"] == "e0")
    d["arrival_ns"][late] = d["deadline_ns"][late] + 500
    d["release_ns"][late] = d["arrival_ns"][late]
    r = fairness_report(sent, d, {1: ["e0", "e1"]}, tau_ns=10)
    assert r.lost_pairs == 1 and r.late_pairs == 1
    assert r.fair_messages == 2  # seq 1 and 4
    assert r.oml_ns.n == 3  # message 2 excluded from OML
    assert r.per_endpoint_late == {"e0": 1}
    assert r.late_fraction == pytest.approx(1 / 8)


def test_expected_set_comes_from_publisher_not_receivers() -> None:
    sent, d = make(3, ["e0"])
    # A subscribed endpoint that never received anything still counts as lost.
    r = fairness_report(sent, d, {1: ["e0", "e9"]})
    assert r.lost_pairs == 3 and r.p_fair == 0.0
    # A record for an unsubscribed endpoint is unexpected, not counted delivered.
    extra = d[:1].copy()
    extra["endpoint"] = "stranger"
    r2 = fairness_report(sent, np.concatenate([d, extra]), {1: ["e0"]})
    assert r2.unexpected_records == 1 and r2.delivered_pairs == 3


def test_repeated_delivery_is_counted() -> None:
    sent, d = make(2, ["e0"])
    r = fairness_report(sent, np.concatenate([d, d[:1]]), {1: ["e0"]})
    assert r.repeated_records == 1 and r.delivered_pairs == 2


def test_warmup_excluded() -> None:
    sent, d = make(10, ["e0"])
    r = fairness_report(sent, d, {1: ["e0"]}, warmup_messages=4)
    assert r.messages == 6 and r.unexpected_records == 0


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(90, 100)
    assert 0.82 < lo < 0.83 and 0.94 < hi < 0.95
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo > 0.7
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_report_text_mentions_tau_and_n() -> None:
    sent, d = make(5, ["e0", "e1"])
    text = fairness_report(sent, d, {1: ["e0", "e1"]}, tau_ns=1000).format_text()
    assert "tau=1 µs" in text and "n=5" in text and "P(F) 100.0%" in text
