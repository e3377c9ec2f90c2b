"""Node clocks: the kernel clock, and a software clock with injected skew that sync corrects."""

from __future__ import annotations

import bisect
import threading
import time
from typing import Protocol

from jasper.clockbound import (
    DEFAULT_MAX_DRIFT_PPM,
    UNKNOWN_BOUND,
    ClockBound,
    ClockStatus,
)

MAX_STEPS_KEPT = 65_536
"""Corrections remembered for `reading_then` (18 hours at one per second)."""


class NodeClock(Protocol):
    """What the data plane and the sync path need from a clock."""

    def now_ns(self) -> int:
        """The node's best estimate of UTC, ns since the epoch."""
        ...

    def bound(self) -> ClockBound:
        """The error bound of `now_ns` readings."""
        ...

    def reading_then(self, true_ns: int) -> int:
        """What `now_ns` read at kernel time `true_ns` (for kernel-stamped records)."""
        ...

    def bound_then(self, true_ns: int) -> ClockBound:
        """The bound in force at kernel time `true_ns`."""
        ...


class SystemClock:
    """CLOCK_REALTIME as is; its bound comes from whoever reads chrony or ClockBound.

    `set_bound` is how a reader (overlay.clocksync) publishes what it learned.
    """

    def __init__(self) -> None:
        self._bound = UNKNOWN_BOUND

    def now_ns(self) -> int:
        return time.time_ns()

    def true_ns(self) -> int:
        return time.time_ns()

    def bound(self) -> ClockBound:
        return self._bound

    def set_bound(self, bound: ClockBound) -> None:
        self._bound = bound

    def reading_at(self, true_ns: int) -> int:
        return true_ns

    def reading_then(self, true_ns: int) -> int:
        """The kernel clock is this node's clock: a kernel timestamp is its reading."""
        return true_ns

    def bound_then(self, true_ns: int) -> ClockBound:
        """The bound in force (the last one read; past ones are not kept)."""
        return self._bound


class SoftwareClock:
    """An emulated node clock over the shared kernel clock, which stands for true time.

    reading = true + offset_ns + drift_ppm * (true - epoch) / 1e6 + correction_ns

    All namespaces on one machine share CLOCK_REALTIME, so skew exists only here, and only
    the node's own sync path (NTP exchanges timestamped with `now_ns`) can remove it:
    `apply_correction` is the only way the correction changes.
    """

    def __init__(
        self,
        *,
        offset_ns: int = 0,
        drift_ppm: float = 0.0,
        max_drift_ppm: float = DEFAULT_MAX_DRIFT_PPM,
        name: str = "",
    ) -> None:
        self.name = name
        self.offset_ns = offset_ns
        self.drift_ppm = drift_ppm
        self.max_drift_ppm = max_drift_ppm
        self._epoch_true_ns = time.time_ns()
        self._correction_ns = 0
        self._bound = ClockBound(
            status=ClockStatus.UNKNOWN,
            as_of_ns=0,
            base_bound_ns=0,
            max_drift_ppm=max_drift_ppm,
            source="unsynchronized",
        )
        # Release threads read the clock while the sync task corrects it.
        self._lock = threading.Lock()
        # (true time of each step, correction after it, bound after it): lets ground truth
        # replay what the clock read and claimed at any past instant. Bounded.
        self._steps_true: list[int] = [self._epoch_true_ns]
        self._steps: list[tuple[int, ClockBound]] = [(0, self._bound)]

    def _skew_ns(self, true_ns: int) -> int:
        return self.offset_ns + int((true_ns - self._epoch_true_ns) * self.drift_ppm / 1e6)

    def true_ns(self) -> int:
        """The kernel clock: true time in this emulation."""
        return time.time_ns()

    def raw_ns(self) -> int:
        """The uncorrected emulated clock (offset and drift, no correction)."""
        return self.reading_at(time.time_ns(), corrected=False)

    def now_ns(self) -> int:
        """The node's corrected clock."""
        return self.reading_at(time.time_ns())

    def reading_at(self, true_ns: int, *, corrected: bool = True) -> int:
        """What the clock reads at kernel time `true_ns` (one kernel read gives both)."""
        reading = true_ns + self._skew_ns(true_ns)
        return reading + self._correction_ns if corrected else reading

    def sample(self) -> tuple[int, int]:
        """(true_ns, now_ns) from one kernel read, so the error is exact."""
        true_ns = time.time_ns()
        return true_ns, self.reading_at(true_ns)

    def error_ns(self) -> int:
        """now_ns - true_ns at this instant: the error a bound must cover."""
        true_ns, now = self.sample()
        return now - true_ns

    @property
    def correction_ns(self) -> int:
        return self._correction_ns

    def apply_correction(self, *, delta_ns: int, bound: ClockBound) -> None:
        """Step the clock by `delta_ns` and install the bound valid after the step."""
        with self._lock:
            self._correction_ns += delta_ns
            self._bound = bound
            self._steps_true.append(time.time_ns())
            self._steps.append((self._correction_ns, bound))
            if len(self._steps) > MAX_STEPS_KEPT:
                del self._steps_true[: MAX_STEPS_KEPT // 2]
                del self._steps[: MAX_STEPS_KEPT // 2]

    def _step_at(self, true_ns: int) -> tuple[int, ClockBound]:
        i = bisect.bisect_right(self._steps_true, true_ns) - 1
        return self._steps[max(i, 0)]

    def reading_then(self, true_ns: int) -> int:
        """What the corrected clock read at past kernel time `true_ns` (with the correction
        in force then, not now): ground truth for records stamped with the kernel clock."""
        return true_ns + self._skew_ns(true_ns) + self._step_at(true_ns)[0]

    def bound_then(self, true_ns: int) -> ClockBound:
        """The bound the clock reported at past kernel time `true_ns`."""
        return self._step_at(true_ns)[1]

    def bound(self) -> ClockBound:
        return self._bound

    def status(self) -> ClockStatus:
        return self._bound.status_at(self.now_ns())

    def bound_now_ns(self) -> int:
        """The bound at this instant, ns (0 when unknown)."""
        b = self._bound
        return b.bound_ns(self.now_ns()) if b.status is not ClockStatus.UNKNOWN else 0
