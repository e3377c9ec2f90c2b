"""ClockBound arithmetic, chrony tracking parsing, ClockBound shm layout, SoftwareClock."""

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.clockbound import (
    NS_PER_S,
    SHM_MAGIC,
    ClockBound,
    ClockStatus,
    ShmParseError,
    ShmSnapshot,
    TrackingParseError,
    bound_from_shm,
    bound_from_tracking,
    encode_clockbound_shm,
    parse_clockbound_shm,
    parse_tracking_csv,
)
from overlay.clocks import SoftwareClock
from overlay.clocksync import read_clockbound_shm

# Captured from `chronyc -c tracking` of a chronyd following a loopback reference.
FOLLOWER = (
    "7F000001,127.0.0.1,2,1795414188.455313756,-0.000001596,-0.000000154,0.000000236,"
    "-0.300,-0.041,1.180,0.000005802,0.000002324,0.1,Normal\n"
)
# ... and of the reference itself (local stratum 1: no delay, no dispersion).
REFERENCE = (
    "7F7F0101,,1,1795414176.953602921,0.000000000,0.000000000,0.000000000,0.000,0.000,"
    "0.000,0.000000000,0.000000000,0.0,Normal\n"
)
UNSYNCED = "00000000,,0,0.000000000,0.000000000,0.000000000,0.000000000,0.000,0.000,0.000,0.000000000,0.000000000,0.0,Not synchronised\n"  # noqa: E501


def test_parse_follower_line() -> None:
    r = parse_tracking_csv(FOLLOWER)
    assert r.ref_name == "127.0.0.1"
    assert r.stratum == 2
    assert r.system_time_offset_s == pytest.approx(-1.596e-6)
    assert r.root_delay_s == pytest.approx(5.802e-6)
    assert r.root_dispersion_s == pytest.approx(2.324e-6)
    assert r.leap_status == "Normal"
    assert r.synchronized
    # |offset| + root dispersion + root delay / 2 = 1596 + 2324 + 2901 ns
    assert r.bound_ns() == 1596 + 2324 + 2901


def test_parse_rejects_garbage() -> None:
    with pytest.raises(TrackingParseError):
        parse_tracking_csv("506 Cannot talk to daemon")
    with pytest.raises(TrackingParseError):
        parse_tracking_csv(FOLLOWER.replace("-0.000001596", "abc"))
    with pytest.raises(TrackingParseError):
        parse_tracking_csv(FOLLOWER + FOLLOWER)


def test_status_from_tracking() -> None:
    ref_time_ns = int(1795414188.455313756 * NS_PER_S)
    fresh = bound_from_tracking(parse_tracking_csv(FOLLOWER), read_at_ns=ref_time_ns + NS_PER_S)
    assert fresh.status is ClockStatus.SYNCHRONIZED
    stale = bound_from_tracking(
        parse_tracking_csv(FOLLOWER), read_at_ns=ref_time_ns + 5_000 * NS_PER_S
    )
    assert stale.status is ClockStatus.FREE_RUNNING
    never = bound_from_tracking(parse_tracking_csv(UNSYNCED), read_at_ns=ref_time_ns)
    assert never.status is ClockStatus.UNKNOWN
    lost = parse_tracking_csv(FOLLOWER.replace("Normal", "Not synchronised"))
    assert bound_from_tracking(lost, read_at_ns=ref_time_ns).status is ClockStatus.FREE_RUNNING
    ref = bound_from_tracking(parse_tracking_csv(REFERENCE), read_at_ns=ref_time_ns)
    assert ref.status is ClockStatus.SYNCHRONIZED
    assert ref.base_bound_ns == 0


def test_bound_grows_at_50_ppm() -> None:
    b = ClockBound(status=ClockStatus.SYNCHRONIZED, as_of_ns=10 * NS_PER_S, base_bound_ns=6_821)
    now = 10 * NS_PER_S
    assert b.bound_ns(now) == 6_821
    assert b.bound_ns(now + NS_PER_S) == 6_821 + 50_000  # 50 ppm of one second
    assert b.bound_ns(now + 2 * NS_PER_S) == 6_821 + 100_000
    assert b.bound_ns(now - NS_PER_S) == 6_821  # never shrinks below the base
    later = now + NS_PER_S
    assert b.earliest_ns(later) == later - 56_821
    assert b.latest_ns(later) == later + 56_821
    assert b.covers(reading_ns=later, true_ns=later + 56_821)
    assert not b.covers(reading_ns=later, true_ns=later + 56_822)
    assert b.status_at(now + 2_000 * NS_PER_S) is ClockStatus.FREE_RUNNING


@given(
    base=st.integers(0, 10**9),
    age=st.integers(0, 10**12),
    ppm=st.floats(0, 500, allow_nan=False),
)
def test_bound_is_monotone_in_time(base: int, age: int, ppm: float) -> None:
    b = ClockBound(
        status=ClockStatus.SYNCHRONIZED, as_of_ns=0, base_bound_ns=base, max_drift_ppm=ppm
    )
    assert b.bound_ns(age) >= base
    assert b.bound_ns(age + 1000) >= b.bound_ns(age)
    assert b.bound_ns(age) >= base + age * ppm / 1e6 - 1


def _snap(version: int, **kw: int) -> ShmSnapshot:
    fields = dict(
        version=version,
        generation=4,
        as_of_mono_ns=1_000 * NS_PER_S + 5,
        void_after_mono_ns=1_010 * NS_PER_S,
        bound_ns=25_000,
        max_drift_ppb=50_000,
        status=1,
    )
    fields.update(kw)
    return ShmSnapshot(**fields)


@pytest.mark.parametrize("version,size", [(1, 72), (2, 80)])
def test_shm_layout_round_trip(version: int, size: int) -> None:
    snap = _snap(version)
    data = encode_clockbound_shm(snap)
    assert len(data) == size
    assert data[:8] == b"AMZNCB\x02\x00"
    assert parse_clockbound_shm(data) == snap


def test_shm_v2_offsets_match_protocol_doc() -> None:
    # PROTOCOL.md v2: magic@0, size@8, version@12, generation@14, as_of@16, void_after@32,
    # bound@48, disruption marker@56, max drift@64, status@68, disruption support@72.
    data = encode_clockbound_shm(_snap(2))
    assert int.from_bytes(data[12:14], "little") == 2
    assert int.from_bytes(data[14:16], "little") == 4
    assert int.from_bytes(data[48:56], "little", signed=True) == 25_000
    assert int.from_bytes(data[64:68], "little") == 50_000
    assert int.from_bytes(data[68:72], "little", signed=True) == 1


def test_shm_bound_growth_and_void() -> None:
    snap = _snap(2)
    b = bound_from_shm(snap, now_mono_ns=snap.as_of_mono_ns + 2 * NS_PER_S, now_realtime_ns=7)
    assert b.status is ClockStatus.SYNCHRONIZED
    assert b.base_bound_ns == 25_000 + 100_000  # 50,000 ppb for 2 s
    assert b.as_of_ns == 7
    void = bound_from_shm(snap, now_mono_ns=snap.void_after_mono_ns + 1, now_realtime_ns=7)
    assert void.status is ClockStatus.UNKNOWN
    disrupted = bound_from_shm(
        _snap(2, status=3), now_mono_ns=snap.as_of_mono_ns, now_realtime_ns=7
    )
    assert disrupted.status is ClockStatus.UNKNOWN


def test_shm_rejects_bad_segments() -> None:
    good = encode_clockbound_shm(_snap(2))
    with pytest.raises(ShmParseError):
        parse_clockbound_shm(b"XXXXXXXX" + good[8:])
    with pytest.raises(ShmParseError):
        parse_clockbound_shm(good[:40])
    with pytest.raises(ShmParseError):
        parse_clockbound_shm(good[:12] + (9).to_bytes(2, "little") + good[14:])


def test_shm_reader_maps_a_segment_file(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    path = tmp_path / "shm0"
    path.write_bytes(
        encode_clockbound_shm(_snap(2, as_of_mono_ns=mono, void_after_mono_ns=mono + 60 * NS_PER_S))
    )
    b = read_clockbound_shm(str(path))
    assert b.status is ClockStatus.SYNCHRONIZED
    assert 25_000 <= b.base_bound_ns < 25_000 + 50_000  # under a second of growth
    path.write_bytes(encode_clockbound_shm(_snap(2, generation=5)))  # writer mid-update
    with pytest.raises(ShmParseError):
        read_clockbound_shm(str(path), retries=3)


def test_software_clock_injects_offset_and_drift() -> None:
    c = SoftwareClock(offset_ns=500_000, drift_ppm=20.0)
    t0 = c._epoch_true_ns
    assert c.reading_at(t0) == t0 + 500_000
    assert c.reading_at(t0 + NS_PER_S) == t0 + NS_PER_S + 500_000 + 20_000
    assert c.bound().status is ClockStatus.UNKNOWN
    err = c.error_ns()
    assert 500_000 <= err < 500_000 + 20_000
    c.apply_correction(
        delta_ns=-500_000,
        bound=ClockBound(status=ClockStatus.SYNCHRONIZED, as_of_ns=c.now_ns(), base_bound_ns=1_000),
    )
    assert abs(c.error_ns()) < 20_000
    assert c.status() is ClockStatus.SYNCHRONIZED
    assert c.correction_ns == -500_000
    true_ns = c.true_ns()
    assert c.reading_at(true_ns, corrected=False) - c.reading_at(true_ns) == 500_000


def test_software_clock_replays_past_readings_and_bounds() -> None:
    c = SoftwareClock(offset_ns=-500_000, drift_ppm=0.0)
    before = c.true_ns()
    time.sleep(0.001)
    b1 = ClockBound(status=ClockStatus.SYNCHRONIZED, as_of_ns=c.now_ns(), base_bound_ns=9_000)
    c.apply_correction(delta_ns=499_000, bound=b1)
    time.sleep(0.001)
    after = c.true_ns()
    # Before the step, the clock read 500 µs behind and claimed nothing.
    assert c.reading_then(before) == before - 500_000
    assert c.bound_then(before).status is ClockStatus.UNKNOWN
    # After it, 1 µs behind, with the bound that came with the step.
    assert c.reading_then(after) == after - 1_000 == c.reading_at(after)
    assert c.bound_then(after) is b1


@settings(max_examples=300)
@given(st.binary(max_size=120))
def test_fuzzed_segments_raise_only_the_parse_error(data: bytes) -> None:
    for blob in (data, SHM_MAGIC + data):
        try:
            snap = parse_clockbound_shm(blob)
        except ShmParseError:
            continue
        assert snap.version in (1, 2)


@given(st.text(max_size=300))
def test_fuzzed_tracking_text_raises_only_the_parse_error(text: str) -> None:
    with contextlib.suppress(TrackingParseError):
        parse_tracking_csv(text)
