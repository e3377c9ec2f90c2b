"""The demo report's first line says when hedging did not reach every endpoint, and why."""

from __future__ import annotations

from typing import Any

from overlay.demo import DemoConfig, _hedging_warning


def summary(full: int, reporting: int, lo: int, hi: int, tree: Any = None) -> dict[str, Any]:
    return {
        "counters": {
            "endpoints_with_h_plus_1_parents": full,
            "endpoints_reporting": reporting,
            "distinct_parents_min": lo,
            "distinct_parents_max": hi,
        },
        "tree": tree,
    }


def test_silent_when_every_endpoint_got_h_plus_1_parents() -> None:
    assert _hedging_warning(summary(20, 20, 3, 3), DemoConfig(receivers=20, fanout=10)) == ""
    assert _hedging_warning(summary(0, 20, 1, 1), DemoConfig(receivers=20, hedge=0)) == ""


def test_small_tree_says_hedging_is_off_or_reduced() -> None:
    off = _hedging_warning(summary(0, 2, 1, 1), DemoConfig(receivers=2, fanout=10, hedge=2))
    assert "hedging OFF" in off
    assert "N=2" in off
    reduced = _hedging_warning(summary(0, 6, 2, 2), DemoConfig(receivers=6, fanout=10, hedge=2))
    assert "hedging reduced" in reduced
    assert "at most 2 distinct parents, not H+1=3" in reduced


def test_planned_but_not_seen_is_reported_as_short() -> None:
    cfg = DemoConfig(receivers=20, fanout=10, hedge=2)
    short = _hedging_warning(summary(15, 20, 2, 3), cfg)
    assert "hedging short: 15/20" in short
    assert "no endpoint received" in _hedging_warning(summary(0, 20, 0, 0), cfg)
    tree = {"planned_parents_min": 1}
    assert "hedging OFF" in _hedging_warning(summary(0, 20, 1, 1, tree), cfg)
