"""Clock error bounds: chrony tracking reports, ClockBound arithmetic and status, no I/O."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

NS_PER_S = 1_000_000_000

DEFAULT_MAX_DRIFT_PPM = 50.0
"""Assumed worst-case frequency error between updates, as AWS ClockBound does (50 ppm)."""

DEFAULT_STALE_AFTER_NS = 1_024 * NS_PER_S
"""A chrony reference older than this (chrony's default maxpoll is 1024 s) counts as stale."""


class ClockStatus(enum.IntEnum):
    """Whether a clock is kept in step with its reference. Values follow ClockBound's shm."""

    UNKNOWN = 0
    """Nothing usable was read: no daemon, bad output, or a disrupted clock."""
    SYNCHRONIZED = 1
    """A sync daemon (chrony, our SNTP client) keeps the clock and updated it recently."""
    FREE_RUNNING = 2
    """The clock was synchronized once but has not been updated since; the bound keeps growing."""

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class TrackingParseError(ValueError):
    """`chronyc -c tracking` output that is not the 14 comma-separated fields we expect."""


@dataclass(frozen=True, slots=True)
class TrackingReport:
    """One `chronyc -c tracking` line, in the units chrony prints (seconds, ppm)."""

    ref_id: str
    """Reference ID as eight hex digits (7F7F0101 = local reference, 00000000 = none)."""
    ref_name: str
    """Name or address of the selected source ("" for the local reference)."""
    stratum: int
    """Stratum of this clock; 0 or 16 means unsynchronized."""
    ref_time_s: float
    """UTC time of the last clock update, seconds since the Unix epoch (0 = never)."""
    system_time_offset_s: float
    """Offset of the system clock from NTP time in seconds (chrony: positive = fast)."""
    last_offset_s: float
    """Offset measured at the last update, seconds."""
    rms_offset_s: float
    """Long-term RMS of the measured offsets, seconds."""
    frequency_ppm: float
    """Frequency error of the system clock, ppm (positive = fast)."""
    residual_freq_ppm: float
    """Residual frequency of the selected source, ppm."""
    skew_ppm: float
    """Estimated error bound on the frequency, ppm."""
    root_delay_s: float
    """Total round-trip delay to the stratum-1 reference, seconds."""
    root_dispersion_s: float
    """Total dispersion accumulated to the stratum-1 reference, seconds."""
    update_interval_s: float
    """Interval between the last two clock updates, seconds."""
    leap_status: str
    """"Normal", "Insert second", "Delete second" or "Not synchronised"."""

    @property
    def synchronized(self) -> bool:
        """chrony considers the clock synchronized to a source."""
        return (
            self.leap_status != "Not synchronised" and 0 < self.stratum < 16 and self.ref_time_s > 0
        )

    def bound_ns(self) -> int:
        """|offset| + root dispersion + root delay / 2, in ns, as ClockBound computes it."""
        seconds = abs(self.system_time_offset_s) + self.root_dispersion_s + self.root_delay_s / 2.0
        return round(seconds * NS_PER_S)


def parse_tracking_csv(text: str) -> TrackingReport:
    """Parse the output of `chronyc -c tracking` (one CSV line of 14 fields)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) != 1:
        raise TrackingParseError(f"expected one line, got {len(lines)}: {text[:200]!r}")
    fields = lines[0].split(",")
    if len(fields) != 14:
        raise TrackingParseError(f"expected 14 fields, got {len(fields)}: {lines[0][:200]!r}")
    try:
        return TrackingReport(
            ref_id=fields[0],
            ref_name=fields[1],
            stratum=int(fields[2]),
            ref_time_s=float(fields[3]),
            system_time_offset_s=float(fields[4]),
            last_offset_s=float(fields[5]),
            rms_offset_s=float(fields[6]),
            frequency_ppm=float(fields[7]),
            residual_freq_ppm=float(fields[8]),
            skew_ppm=float(fields[9]),
            root_delay_s=float(fields[10]),
            root_dispersion_s=float(fields[11]),
            update_interval_s=float(fields[12]),
            leap_status=fields[13],
        )
    except ValueError as exc:
        raise TrackingParseError(f"bad number in {lines[0][:200]!r}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ClockBound:
    """A clock's error bound at one instant, growing at `max_drift_ppm` after it.

    Between updates the true time t of a clock reading c satisfies
    |c - t| <= bound_ns + (c - as_of_ns) * max_drift_ppm / 1e6.
    """

    status: ClockStatus
    """Synchronized, free-running or unknown."""
    as_of_ns: int
    """Clock reading (ns since the epoch, on the bounded clock) at which `base_bound_ns` held."""
    base_bound_ns: int
    """Error bound at `as_of_ns`, ns."""
    max_drift_ppm: float = DEFAULT_MAX_DRIFT_PPM
    """Growth rate of the bound after `as_of_ns`, ppm."""
    source: str = ""
    """Where the bound came from ("chrony 127.0.0.1:11123", "sntp", "clockbound-shm")."""

    def bound_ns(self, now_ns: int) -> int:
        """The error bound at clock reading `now_ns`, ns (never below the base bound)."""
        age_ns = max(0, now_ns - self.as_of_ns)
        return self.base_bound_ns + int(age_ns * self.max_drift_ppm / 1e6 + 0.999999)

    def earliest_ns(self, now_ns: int) -> int:
        """The earliest true time the clock reading `now_ns` may stand for."""
        return now_ns - self.bound_ns(now_ns)

    def latest_ns(self, now_ns: int) -> int:
        """The latest true time the clock reading `now_ns` may stand for."""
        return now_ns + self.bound_ns(now_ns)

    def covers(self, *, reading_ns: int, true_ns: int) -> bool:
        """The true time lies within [earliest, latest] of the reading."""
        return self.earliest_ns(reading_ns) <= true_ns <= self.latest_ns(reading_ns)

    def status_at(
        self, now_ns: int, *, stale_after_ns: int = DEFAULT_STALE_AFTER_NS
    ) -> ClockStatus:
        """The status, demoted to free-running once the update is older than `stale_after_ns`."""
        if self.status is ClockStatus.SYNCHRONIZED and now_ns - self.as_of_ns > stale_after_ns:
            return ClockStatus.FREE_RUNNING
        return self.status


UNKNOWN_BOUND = ClockBound(status=ClockStatus.UNKNOWN, as_of_ns=0, base_bound_ns=0, source="")
"""What a reader returns when it could read nothing."""


def bound_from_tracking(
    report: TrackingReport,
    *,
    read_at_ns: int,
    max_drift_ppm: float = DEFAULT_MAX_DRIFT_PPM,
    stale_after_ns: int = DEFAULT_STALE_AFTER_NS,
    source: str = "chrony",
) -> ClockBound:
    """The ClockBound of a chrony tracking report read at clock reading `read_at_ns`.

    chrony computes the root dispersion in the report at the time of the request (it adds
    the growth since its last update), so the bound is anchored at the read time and grows at
    `max_drift_ppm` from there, as ClockBound's daemon does between its polls of chrony.
    """
    if report.synchronized:
        ref_ns = int(report.ref_time_s * NS_PER_S)
        stale = read_at_ns - ref_ns > stale_after_ns
        status = ClockStatus.FREE_RUNNING if stale else ClockStatus.SYNCHRONIZED
    elif report.ref_time_s > 0:
        status = ClockStatus.FREE_RUNNING
    else:
        status = ClockStatus.UNKNOWN
    return ClockBound(
        status=status,
        as_of_ns=read_at_ns,
        base_bound_ns=report.bound_ns(),
        max_drift_ppm=max_drift_ppm,
        source=source,
    )


# --- AWS ClockBound shared memory segment (/var/run/clockbound/shm0), native endian ---------

SHM_MAGIC = bytes([0x41, 0x4D, 0x5A, 0x4E, 0x43, 0x42, 0x02, 0x00])
"""Signature of a ClockBound segment ("AMZNCB" 0x02 0x00)."""

_SHM_PREFIX = struct.Struct("=8sIHH")  # magic, segment size, version, generation
_SHM_V2 = struct.Struct("=8sIHHqqqqqQIiB7x")  # 80 bytes
_SHM_V1 = struct.Struct("=8sIHHqqqqqIIi4x")  # 72 bytes


class ShmParseError(ValueError):
    """Bytes that are not a ClockBound shared memory segment we understand."""


@dataclass(frozen=True, slots=True)
class ShmSnapshot:
    """One consistent read of the ClockBound segment (times on CLOCK_MONOTONIC_COARSE)."""

    version: int
    """Layout version (1 or 2)."""
    generation: int
    """Update counter: odd while the daemon writes; the reader retries on odd or changed."""
    as_of_mono_ns: int
    """Monotonic time at which `bound_ns` was computed."""
    void_after_mono_ns: int
    """Monotonic time after which the bound must not be trusted."""
    bound_ns: int
    """Bound on |CLOCK_REALTIME - true time| at `as_of_mono_ns`, ns."""
    max_drift_ppb: int
    """Growth rate of the bound, parts per billion."""
    status: int
    """0 unknown, 1 synchronized, 2 free-running, 3 disrupted."""


def parse_clockbound_shm(data: bytes) -> ShmSnapshot:
    """Decode a ClockBound shared memory segment (protocol version 1 or 2)."""
    if len(data) < _SHM_PREFIX.size:
        raise ShmParseError(f"segment too short: {len(data)} bytes")
    magic, _size, version, generation = _SHM_PREFIX.unpack_from(data)
    if magic != SHM_MAGIC:
        raise ShmParseError(f"bad magic {magic.hex()}")
    if version == 2:
        if len(data) < _SHM_V2.size:
            raise ShmParseError(f"v2 segment too short: {len(data)} bytes")
        f = _SHM_V2.unpack_from(data)
        as_s, as_ns, void_s, void_ns, bound, _marker, drift, status = f[4:12]
    elif version == 1:
        if len(data) < _SHM_V1.size:
            raise ShmParseError(f"v1 segment too short: {len(data)} bytes")
        f = _SHM_V1.unpack_from(data)
        as_s, as_ns, void_s, void_ns, bound, drift, _reserved, status = f[4:12]
    else:
        raise ShmParseError(f"unsupported version {version}")
    return ShmSnapshot(
        version=version,
        generation=generation,
        as_of_mono_ns=as_s * NS_PER_S + as_ns,
        void_after_mono_ns=void_s * NS_PER_S + void_ns,
        bound_ns=bound,
        max_drift_ppb=drift,
        status=status,
    )


def encode_clockbound_shm(snap: ShmSnapshot) -> bytes:
    """Encode a segment in the daemon's layout (for tests and for emulated hosts)."""
    as_s, as_ns = divmod(snap.as_of_mono_ns, NS_PER_S)
    void_s, void_ns = divmod(snap.void_after_mono_ns, NS_PER_S)
    if snap.version == 2:
        return _SHM_V2.pack(
            SHM_MAGIC, _SHM_V2.size, 2, snap.generation, as_s, as_ns, void_s, void_ns,
            snap.bound_ns, 0, snap.max_drift_ppb, snap.status, 0,
        )  # fmt: skip
    if snap.version == 1:
        return _SHM_V1.pack(
            SHM_MAGIC, _SHM_V1.size, 1, snap.generation, as_s, as_ns, void_s, void_ns,
            snap.bound_ns, snap.max_drift_ppb, 0, snap.status,
        )  # fmt: skip
    raise ShmParseError(f"unsupported version {snap.version}")


def bound_from_shm(snap: ShmSnapshot, *, now_mono_ns: int, now_realtime_ns: int) -> ClockBound:
    """The ClockBound of a shm snapshot, expressed on the realtime clock read at `now_*`.

    The segment is stamped on the monotonic clock; the bound is re-anchored at the realtime
    reading taken together with `now_mono_ns`, grown by the drift since `as_of`. A snapshot
    past its void-after time, or with status disrupted or unknown, reports unknown.
    """
    age_ns = max(0, now_mono_ns - snap.as_of_mono_ns)
    grown = snap.bound_ns + int(age_ns * snap.max_drift_ppb / 1e9 + 0.999999)
    if now_mono_ns > snap.void_after_mono_ns or snap.status not in (1, 2):
        status = ClockStatus.UNKNOWN
    else:
        status = ClockStatus(snap.status)
    return ClockBound(
        status=status,
        as_of_ns=now_realtime_ns,
        base_bound_ns=grown,
        max_drift_ppm=snap.max_drift_ppb / 1000.0,
        source="clockbound-shm",
    )
