"""Duplicate filter: ring semantics, reordering window, publisher sessions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jasper.dedup import DedupFilter, DedupRing, Verdict


def test_first_copy_accepted_later_copies_dropped() -> None:
    ring = DedupRing(size=8)
    assert ring.check(1, 5) is Verdict.ACCEPT
    assert ring.check(1, 5) is Verdict.DUPLICATE
    assert ring.check(1, 5) is Verdict.DUPLICATE
    assert ring.check(1, 6) is Verdict.ACCEPT


def test_reordering_within_window_is_exact() -> None:
    ring = DedupRing(size=8)
    for seq in (3, 1, 2, 7, 5, 4, 6, 8):
        assert ring.check(1, seq) is Verdict.ACCEPT
    for seq in range(1, 9):
        assert ring.check(1, seq) is Verdict.DUPLICATE


def test_copy_older_than_window_is_stale_not_redelivered() -> None:
    ring = DedupRing(size=8)
    assert ring.check(1, 1) is Verdict.ACCEPT
    assert ring.check(1, 9) is Verdict.ACCEPT  # same slot, one window later
    assert ring.check(1, 1) is Verdict.STALE


def test_new_session_resets_old_session_is_stale() -> None:
    ring = DedupRing(size=8)
    assert ring.check(1, 100) is Verdict.ACCEPT
    # A restarted publisher starts over at seq 1 under a larger session: not a duplicate.
    assert ring.check(2, 1) is Verdict.ACCEPT
    assert ring.check(2, 100) is Verdict.ACCEPT
    assert ring.check(1, 101) is Verdict.STALE


def test_seq_zero_is_never_accepted() -> None:
    assert DedupRing(size=4).check(1, 0) is Verdict.STALE


@pytest.mark.parametrize("size", [0, 1, 3, 100])
def test_size_must_be_power_of_two(size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        DedupRing(size=size)


def test_filter_keys_by_endpoint_and_stream_and_counts() -> None:
    f = DedupFilter(ring_size=16)
    assert f.check("e0", 1, 1, 1) is Verdict.ACCEPT
    assert f.check("e1", 1, 1, 1) is Verdict.ACCEPT
    assert f.check("e0", 2, 1, 1) is Verdict.ACCEPT
    assert f.check("e0", 1, 1, 1) is Verdict.DUPLICATE
    assert (f.counters.accepted, f.counters.duplicates, f.counters.stale) == (3, 1, 0)


@given(st.lists(st.integers(1, 200), min_size=1, max_size=400), st.integers(2, 6))
def test_each_seq_accepted_at_most_once_when_displacement_fits(seqs: list[int], hedge: int) -> None:
    # H+1 copies of each message, shuffled within a small window: exactly one accepted per seq.
    ring = DedupRing(size=256)
    accepted: list[int] = []
    stream = sorted(set(seqs))
    copies = [s for s in stream for _ in range(hedge)]
    # Interleave copies with a bounded displacement (< ring size).
    copies = copies[::2] + copies[1::2] if len(copies) < 256 else copies
    for s in copies:
        if ring.check(1, s) is Verdict.ACCEPT:
            accepted.append(s)
    assert sorted(accepted) == stream
