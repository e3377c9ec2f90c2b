"""Release audit log: layout, round trip, append, crash tail, summary flags, `jasper audit`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.audit import (
    AUDIT_DTYPE,
    BOUND_SATURATED,
    FLAG_LATE_ARRIVAL,
    MAGIC,
    RECORD_SIZE,
    AuditFormatError,
    AuditRecord,
    decode_records,
    encode_header,
    encode_record,
    record_at,
    summarize,
)
from jasper.clockbound import ClockBound, ClockStatus
from jasper_cli.main import main as jasper_main
from overlay.audit_log import AuditLogWriter

T0 = 1_795_414_188_000_000_000


def test_record_layout_is_40_bytes_and_matches_dtype() -> None:
    assert RECORD_SIZE == 40 == AUDIT_DTYPE.itemsize
    rec = AuditRecord(
        stream_id=7, seq=2**40 + 3, endpoint=19, deadline_ns=T0, release_ns=T0 + 1_234,
        bound_ns=56_789, status=ClockStatus.SYNCHRONIZED, flags=FLAG_LATE_ARRIVAL,
    )  # fmt: skip
    arr = np.frombuffer(encode_record(rec), dtype=AUDIT_DTYPE)
    assert record_at(arr, 0) == rec
    assert rec.divergence_ns == 1_234


def _bound(base_ns: int, status: ClockStatus = ClockStatus.SYNCHRONIZED) -> ClockBound:
    return ClockBound(status=status, as_of_ns=T0, base_bound_ns=base_ns)


def _write(path: Path, n: int, *, bound_ns: int = 30_000, endpoints: int = 4) -> None:
    names = [f"mp{i}" for i in range(endpoints)]
    with AuditLogWriter(path, node="r1", endpoints=names, flush_records=7) as w:
        for seq in range(1, n + 1):
            w.release(
                stream_id=1, seq=seq, endpoint=seq % endpoints, deadline_ns=T0 + seq * 1_000,
                release_ns=T0 + seq * 1_000 + 5_000 + seq % 3, bound=_bound(bound_ns),
            )  # fmt: skip


def test_writer_round_trip_and_append(tmp_path: Path) -> None:
    path = tmp_path / "r1.audit"
    _write(path, 100)
    header, arr, tail = decode_records(path.read_bytes())
    assert header.meta["node"] == "r1" and header.meta["endpoints"][3] == "mp3"
    assert len(arr) == 100 and tail == 0
    r = record_at(arr, 41)
    assert (r.stream_id, r.seq, r.endpoint) == (1, 42, 2)
    assert r.deadline_ns == T0 + 42_000 and r.release_ns == T0 + 42_000 + 5_000
    # The bound is the one in force at the release: base + 50 ppm since as_of.
    assert r.bound_ns == 30_000 + -(-(42_000 + 5_000) * 50 // 1_000_000)
    assert r.status is ClockStatus.SYNCHRONIZED
    size = path.stat().st_size
    assert size == header.length + 100 * RECORD_SIZE  # compact: 40 bytes per release
    _write(path, 10)  # reopening appends after the existing records
    header2, arr2, _ = decode_records(path.read_bytes())
    assert header2.meta == header.meta and len(arr2) == 110


def test_crash_tail_is_counted_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "r1.audit"
    _write(path, 10)
    with path.open("ab") as f:
        f.write(b"\x01" * 17)  # a record cut short
    _, arr, tail = decode_records(path.read_bytes())
    assert len(arr) == 10 and tail == 17


def test_not_an_audit_log(tmp_path: Path) -> None:
    bad = tmp_path / "x"
    bad.write_bytes(b"hello world, this is no audit log")
    with pytest.raises(AuditFormatError):
        decode_records(bad.read_bytes())
    with pytest.raises(AuditFormatError):
        AuditLogWriter(bad, node="r", endpoints=[])


def test_summary_flags_bounds_over_threshold_and_unsynchronized(tmp_path: Path) -> None:
    path = tmp_path / "r2.audit"
    with AuditLogWriter(path, node="r2", endpoints=["a", "b"]) as w:
        for seq in range(1, 101):
            w.release(stream_id=1, seq=seq, endpoint=0, deadline_ns=T0, release_ns=T0 + 3_000,
                      bound=_bound(20_000))  # fmt: skip
        w.release(stream_id=1, seq=101, endpoint=1, deadline_ns=T0, release_ns=T0 + 1_000,
                  bound=_bound(150_000))  # fmt: skip
        w.release(stream_id=1, seq=102, endpoint=1, deadline_ns=T0, release_ns=T0 + 1_000,
                  bound=_bound(10_000, ClockStatus.FREE_RUNNING))  # fmt: skip
        w.release(stream_id=1, seq=103, endpoint=1, deadline_ns=T0, release_ns=T0 + 900_000,
                  bound=_bound(0, ClockStatus.UNKNOWN), late_arrival=True)  # fmt: skip
    s = summarize([decode_records(path.read_bytes())], threshold_ns=100_000)
    assert s.releases == 103
    assert s.over_threshold == 1
    assert s.unsynchronized == 2  # free-running and unknown
    assert s.flagged == 3 and not s.meets_rts25
    assert {r.seq for r in s.flagged_examples} == {101, 102, 103}
    assert s.late_arrivals == 1
    assert s.divergence.p50 == 3_000 and s.divergence.max == 900_000
    assert s.bound.max == 150_000 + 1  # 1 µs at 50 ppm rounds up to 1 ns
    assert s.worst_case_utc_divergence_ns == 1_000 + 150_001
    assert s.per_endpoint == {"a": 100, "b": 3}
    _, arr, _ = decode_records(path.read_bytes())
    assert int(arr["bound_ns"][-1]) == BOUND_SATURATED


def test_jasper_audit_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.audit"
    _write(good, 200, bound_ns=30_000)
    assert jasper_main(["audit", str(good)]) == 0
    out = capsys.readouterr().out
    assert "releases            200 in 1 file(s), 4 endpoints" in out
    assert "release - deadline  p50 5.0 us" in out
    assert "flagged             0" in out
    assert "RTS 25" in out and "100 us" in out and "granularity" in out
    assert "Verdict: MET" in out

    loose = tmp_path / "loose.audit"
    _write(loose, 50, bound_ns=120_000)
    assert jasper_main(["audit", str(good), str(loose)]) == 1
    out = capsys.readouterr().out
    assert "bound > 100 us     50" in out
    assert "Verdict: NOT MET" in out
    assert "flagged: stream 1 seq 1 endpoint 1 bound 120.0 us" in out

    assert jasper_main(["audit", "--json", "--threshold-us", "150", str(good), str(loose)]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["releases"] == 250 and j["flagged"] == 0 and j["meets_rts25"] is True

    bad = tmp_path / "bad"
    bad.write_bytes(b"nope")
    assert jasper_main(["audit", str(bad)]) == 2


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_fuzzed_files_raise_only_the_format_error(data: bytes) -> None:
    for blob in (data, MAGIC + data, encode_header({"node": "x"}) + data):
        try:
            _, arr, tail = decode_records(blob)
        except AuditFormatError:
            continue
        assert tail < RECORD_SIZE and arr.dtype == AUDIT_DTYPE
