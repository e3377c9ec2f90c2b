"""SNTP (RFC 4330) packets, the offset/delay of one exchange, and min-delay sample filtering."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

NS_PER_S = 1_000_000_000
NTP_UNIX_DELTA_S = 2_208_988_800
"""Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01)."""

PACKET_LEN = 48
MODE_CLIENT = 3
MODE_SERVER = 4
LEAP_UNSYNCHRONIZED = 3

_PACKET = struct.Struct("!BBbbII4sQQQQ")


class NtpError(ValueError):
    """A reply that is not a valid answer to our request. `reason` is a counter token."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def ns_to_ntp(unix_ns: int) -> int:
    """Unix time in ns to a 64-bit NTP timestamp (32.32 fixed point since 1900)."""
    secs, frac_ns = divmod(unix_ns, NS_PER_S)
    frac = (frac_ns << 32) // NS_PER_S
    return (((secs + NTP_UNIX_DELTA_S) & 0xFFFFFFFF) << 32) | frac


def ntp_to_ns(ntp: int) -> int:
    """A 64-bit NTP timestamp to Unix time in ns (era 0, i.e. until 2036)."""
    secs = (ntp >> 32) - NTP_UNIX_DELTA_S
    frac_ns = ((ntp & 0xFFFFFFFF) * NS_PER_S + (1 << 31)) >> 32
    return secs * NS_PER_S + frac_ns


def _short_to_ns(value: int) -> int:
    """An NTP short format (16.16 seconds) to ns."""
    return (value * NS_PER_S + (1 << 15)) >> 16


@dataclass(frozen=True, slots=True)
class NtpPacket:
    """The 48-byte NTP header."""

    leap: int
    """Leap indicator, 0..3 (3 = server unsynchronized)."""
    version: int
    """Protocol version, 1..4."""
    mode: int
    """3 = client, 4 = server."""
    stratum: int
    """Server stratum; 0 = kiss-o'-death or unspecified, 16 = unsynchronized."""
    poll: int
    """log2 of the poll interval, s."""
    precision: int
    """log2 of the clock precision, s (e.g. -20 ~ 1 µs)."""
    root_delay_ns: int
    """Round-trip delay to the reference clock, ns."""
    root_dispersion_ns: int
    """Dispersion to the reference clock, ns."""
    ref_id: bytes
    """Reference identifier, 4 bytes."""
    reference_ts: int
    """Last time the server clock was set, raw NTP timestamp."""
    origin_ts: int
    """Client transmit timestamp echoed by the server, raw NTP timestamp."""
    receive_ts: int
    """Server receive time, raw NTP timestamp."""
    transmit_ts: int
    """Transmit time of this packet, raw NTP timestamp."""


def encode_request(transmit_ns: int, *, version: int = 4) -> bytes:
    """A client request whose transmit timestamp is the client clock reading `transmit_ns`.

    The server echoes that field as its origin timestamp, which is how a reply is matched.
    """
    return encode_request_cookie(ns_to_ntp(transmit_ns), version=version)


def encode_request_cookie(cookie: int, *, version: int = 4) -> bytes:
    """A client request carrying an opaque 64-bit `cookie` in its transmit timestamp field.

    As chrony's own client does, the real t1 then stays local: it can be read after the
    packet is built, right before the send, and the reply is matched by the echoed cookie.
    """
    first = (0 << 6) | (version << 3) | MODE_CLIENT
    return _PACKET.pack(first, 0, 0, 0, 0, 0, b"\0\0\0\0", 0, 0, 0, cookie)


def decode_packet(data: bytes) -> NtpPacket:
    """Decode an NTP header; extension fields and MACs after 48 bytes are ignored."""
    if len(data) < PACKET_LEN:
        raise NtpError("short", f"{len(data)} bytes")
    first, stratum, poll, precision, rdelay, rdisp, ref_id, ref_ts, org, rec, xmt = (
        _PACKET.unpack_from(data)
    )
    return NtpPacket(
        leap=first >> 6,
        version=(first >> 3) & 7,
        mode=first & 7,
        stratum=stratum,
        poll=poll,
        precision=precision,
        root_delay_ns=_short_to_ns(rdelay),
        root_dispersion_ns=_short_to_ns(rdisp),
        ref_id=ref_id,
        reference_ts=ref_ts,
        origin_ts=org,
        receive_ts=rec,
        transmit_ts=xmt,
    )


@dataclass(frozen=True, slots=True)
class NtpSample:
    """One client/server exchange, reduced to offset, delay and the server's own error."""

    t1_ns: int
    """Client transmit time, on the client clock."""
    t2_ns: int
    """Server receive time, on the server clock."""
    t3_ns: int
    """Server transmit time, on the server clock."""
    t4_ns: int
    """Client receive time, on the client clock."""
    server_root_delay_ns: int
    """Root delay the server advertised, ns."""
    server_root_dispersion_ns: int
    """Root dispersion the server advertised, ns."""
    server_precision_ns: int
    """The server's clock precision, ns (2^precision s, rounded up)."""
    stratum: int
    """Server stratum."""

    @property
    def offset_ns(self) -> int:
        """Server clock minus client clock: ((t2 - t1) + (t3 - t4)) / 2."""
        return ((self.t2_ns - self.t1_ns) + (self.t3_ns - self.t4_ns)) // 2

    @property
    def delay_ns(self) -> int:
        """Round trip minus the server's hold time: (t4 - t1) - (t3 - t2), at least 0."""
        return max(0, (self.t4_ns - self.t1_ns) - (self.t3_ns - self.t2_ns))

    def bound_ns(self, *, client_precision_ns: int = 0) -> int:
        """Worst-case error of `offset_ns` against the server's reference.

        Any asymmetry between the two legs shifts the offset by at most half the delay; the
        server itself is within root dispersion + root delay / 2 of its reference; each side's
        timestamps are within their precision.
        """
        return (
            (self.delay_ns + 1) // 2
            + self.server_root_dispersion_ns
            + (self.server_root_delay_ns + 1) // 2
            + self.server_precision_ns
            + client_precision_ns
        )


def sample_from_reply(
    data: bytes, *, t1_ns: int, t4_ns: int, cookie: int | None = None
) -> NtpSample:
    """Check a server reply against our request sent at `t1_ns` and reduce it to a sample.

    The reply must echo `cookie` (when the request carried one) or else t1 itself.
    """
    pkt = decode_packet(data)
    if pkt.mode != MODE_SERVER:
        raise NtpError("mode", f"mode {pkt.mode}")
    if pkt.origin_ts != (ns_to_ntp(t1_ns) if cookie is None else cookie):
        raise NtpError("origin", "reply does not echo our transmit timestamp")
    if pkt.stratum == 0:
        raise NtpError("kod", f"kiss-o'-death {pkt.ref_id!r}")
    if pkt.leap == LEAP_UNSYNCHRONIZED or pkt.stratum >= 16:
        raise NtpError("unsynchronized", f"leap {pkt.leap} stratum {pkt.stratum}")
    if pkt.receive_ts == 0 or pkt.transmit_ts == 0:
        raise NtpError("timestamps", "zero server timestamp")
    precision_ns = int(2.0**pkt.precision * NS_PER_S + 0.999999)
    return NtpSample(
        t1_ns=t1_ns,
        t2_ns=ntp_to_ns(pkt.receive_ts),
        t3_ns=ntp_to_ns(pkt.transmit_ts),
        t4_ns=t4_ns,
        server_root_delay_ns=pkt.root_delay_ns,
        server_root_dispersion_ns=pkt.root_dispersion_ns,
        server_precision_ns=precision_ns,
        stratum=pkt.stratum,
    )


@dataclass(frozen=True, slots=True)
class OffsetEstimate:
    """Result of filtering a burst of samples: the correction to apply and its bound."""

    offset_ns: int
    """Server minus client, ns: add this to the client clock."""
    bound_ns: int
    """Bound on the error of `offset_ns` at `as_of_ns`, ns."""
    as_of_ns: int
    """Client clock reading (before correction) at which the estimate holds: the sample's t4."""
    delay_ns: int
    """Round-trip delay of the chosen sample, ns."""
    samples: int
    """How many valid samples the filter saw."""


def min_delay_estimate(
    samples: Sequence[NtpSample],
    *,
    client_precision_ns: int = 0,
    max_drift_ppm: float = 50.0,
) -> OffsetEstimate:
    """Pick the sample with the least round-trip delay (its offset is least distorted).

    Its bound is widened by `max_drift_ppm` for the time from that sample to the last one,
    because the estimate is applied after the whole burst.
    """
    if not samples:
        raise ValueError("no samples")
    best = min(samples, key=lambda s: (s.delay_ns, s.t4_ns))
    last_t4 = max(s.t4_ns for s in samples)
    age_ns = max(0, last_t4 - best.t4_ns)
    bound = best.bound_ns(client_precision_ns=client_precision_ns) + int(
        age_ns * max_drift_ppm / 1e6 + 0.999999
    )
    return OffsetEstimate(
        offset_ns=best.offset_ns,
        bound_ns=bound,
        as_of_ns=best.t4_ns,
        delay_ns=best.delay_ns,
        samples=len(samples),
    )
