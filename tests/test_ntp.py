"""SNTP packets, offset/delay arithmetic, and the min-delay filter's bound."""

from __future__ import annotations

import contextlib
import struct

import ntplib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.ntp import (
    NTP_UNIX_DELTA_S,
    PACKET_LEN,
    NtpError,
    NtpSample,
    decode_packet,
    encode_request,
    min_delay_estimate,
    ns_to_ntp,
    ntp_to_ns,
    sample_from_reply,
)

T0 = 1_795_414_188_455_313_756


@given(st.integers(0, (2**32 - NTP_UNIX_DELTA_S - 1) * 10**9))
def test_timestamp_round_trip_within_a_nanosecond(unix_ns: int) -> None:
    assert abs(ntp_to_ns(ns_to_ntp(unix_ns)) - unix_ns) <= 1


def test_request_agrees_with_ntplib() -> None:
    raw = encode_request(T0)
    assert len(raw) == PACKET_LEN
    theirs = ntplib.NTPPacket()
    theirs.from_data(raw)
    assert theirs.mode == 3 and theirs.version == 4
    assert theirs.tx_timestamp == pytest.approx(T0 / 1e9 + NTP_UNIX_DELTA_S, abs=1e-6)


def _reply(
    *, t1: int, t2: int, t3: int, leap: int = 0, stratum: int = 1, mode: int = 4,
    root_delay_s: float = 0.0, root_disp_s: float = 0.0, precision: int = -20,
) -> bytes:  # fmt: skip
    """A server reply laid out by hand per RFC 5905 (not with our own encoder)."""
    first = (leap << 6) | (4 << 3) | mode
    return struct.pack(
        "!BBbbII4sQQQQ", first, stratum, 6, precision, int(root_delay_s * 65536),
        int(root_disp_s * 65536), b"LOCL", ns_to_ntp(t2 - 10**9), ns_to_ntp(t1),
        ns_to_ntp(t2), ns_to_ntp(t3),
    )  # fmt: skip


def test_offset_and_delay_of_one_exchange() -> None:
    # Client is 400 µs behind; legs of 30 and 50 µs; the server holds it 10 µs.
    true_send = T0
    t1 = true_send - 400_000
    t2 = true_send + 30_000
    t3 = t2 + 10_000
    t4 = t3 + 50_000 - 400_000
    s = sample_from_reply(
        _reply(t1=t1, t2=t2, t3=t3, root_delay_s=2**-10, root_disp_s=2**-11), t1_ns=t1, t4_ns=t4
    )
    assert s.delay_ns == 80_000
    assert s.offset_ns == 400_000 - 10_000  # asymmetry (30 vs 50) shows up as half of 20 µs
    assert s.server_root_delay_ns == pytest.approx(976_562, abs=1)  # 2^-10 s
    assert s.server_root_dispersion_ns == pytest.approx(488_281, abs=1)
    assert s.server_precision_ns == 954  # 2^-20 s
    assert abs(s.offset_ns - 400_000) <= s.bound_ns()


@pytest.mark.parametrize(
    "kw,reason",
    [
        ({"mode": 3}, "mode"),
        ({"stratum": 0}, "kod"),
        ({"leap": 3}, "unsynchronized"),
        ({"stratum": 16}, "unsynchronized"),
    ],
)
def test_bad_replies_are_refused(kw: dict[str, int], reason: str) -> None:
    data = _reply(t1=T0, t2=T0 + 1, t3=T0 + 2, **kw)
    with pytest.raises(NtpError) as exc:
        sample_from_reply(data, t1_ns=T0, t4_ns=T0 + 3)
    assert exc.value.reason == reason


def test_reply_must_echo_our_timestamp() -> None:
    data = _reply(t1=T0 + 1_000, t2=T0, t3=T0)
    with pytest.raises(NtpError) as exc:
        sample_from_reply(data, t1_ns=T0, t4_ns=T0 + 10)
    assert exc.value.reason == "origin"
    with pytest.raises(NtpError) as exc:
        decode_packet(data[:40])
    assert exc.value.reason == "short"


def _sample(t1: int, out_ns: int, back_ns: int, offset_ns: int) -> NtpSample:
    """An exchange where the client clock is `offset_ns` behind the server."""
    t2 = t1 + offset_ns + out_ns
    t3 = t2 + 5_000
    t4 = t3 - offset_ns + back_ns
    return NtpSample(t1, t2, t3, t4, 0, 0, 0, 1)


def test_min_delay_filter_picks_the_least_distorted() -> None:
    samples = [
        _sample(T0, 200_000, 40_000, 123_000),  # queued outbound: offset way off
        _sample(T0 + 10**6, 20_000, 22_000, 123_000),  # the quiet one
        _sample(T0 + 2 * 10**6, 30_000, 300_000, 123_000),
    ]
    est = min_delay_estimate(samples, max_drift_ppm=50)
    assert est.delay_ns == 42_000
    assert est.offset_ns == 123_000 - 1_000
    assert est.samples == 3
    assert est.as_of_ns == samples[1].t4_ns
    # Half the delay, plus 50 ppm for the time until the last sample of the burst.
    age_ns = samples[2].t4_ns - samples[1].t4_ns
    assert est.bound_ns == 21_000 + -(-age_ns * 50 // 1_000_000)
    assert abs(est.offset_ns - 123_000) <= est.bound_ns
    with pytest.raises(ValueError):
        min_delay_estimate([])


@given(
    legs=st.lists(
        st.tuples(st.integers(1_000, 10**6), st.integers(1_000, 10**6)), min_size=1, max_size=8
    ),
    offset=st.integers(-(10**7), 10**7),
)
def test_bound_always_covers_the_true_offset(legs: list[tuple[int, int]], offset: int) -> None:
    samples = [_sample(T0 + i * 10**6, a, b, offset) for i, (a, b) in enumerate(legs)]
    est = min_delay_estimate(samples)
    assert abs(est.offset_ns - offset) <= est.bound_ns


@settings(max_examples=300)
@given(st.binary(max_size=100))
def test_fuzzed_replies_raise_only_ntp_errors(data: bytes) -> None:
    for blob in (data, _reply(t1=T0, t2=T0, t3=T0)[:2] + data):
        with contextlib.suppress(NtpError):
            sample_from_reply(blob, t1_ns=T0, t4_ns=T0 + 1)
