"""Release deadline policy: delay estimate + clock bounds + an extra hold tuned to a lateness goal.

deadline = send time + global delay estimate + root's bound + largest receiver bound + hold

Driven window by window: after each window the controller (or the root) calls
`DeadlinePolicy.observe(report, ..., now_ns)` with the max-reduced `OwdReport` of that window;
the policy returns the hold in force, which goes to the publisher (`Publisher.set_hold_ns`).

Adaptive mode moves the extra hold toward a lateness objective with hysteresis:
- worst endpoint late fraction above the objective: grow the hold by a step that doubles
  with each consecutive late window (5, 10, 20 ... µs, capped);
- at or below `objective * low_water` for `calm_windows` windows in a row: shrink by a step
  that also doubles while the calm lasts (capped lower than the growth);
- in between: keep, and reset both streaks.
CloudEx moves its hold by 5 µs per 1,000-sample window; every step here is at least 5 µs and
a window is at most 1,000 samples, so it converges at least as fast and usually much faster.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from jasper.owd import OwdReport


class HoldAction(enum.Enum):
    """What a window made the adaptive hold do."""

    UP = "up"
    DOWN = "down"
    KEEP = "keep"
    FIXED = "fixed"
    NO_DATA = "no-data"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadlineConfig:
    """Policy settings. All durations in ns."""

    adaptive: bool = True
    """Tune the extra hold to the objective; False keeps `initial_hold_ns` for ever."""
    percentile: str = "p97"
    """Which reported delay percentile is the global delay estimate (paper: p95-p97)."""
    objective_late_fraction: float = 0.01
    """Target: at most this fraction of one endpoint's messages late per window."""
    low_water: float = 0.5
    """Shrink only when lateness is at or below objective * low_water (hysteresis band)."""
    calm_windows: int = 2
    """Consecutive calm windows needed before each shrink step."""
    step_ns: int = 5_000
    """First step up or down (CloudEx's 5 µs)."""
    max_step_up_ns: int = 80_000
    """Cap of the doubling step when growing."""
    max_step_down_ns: int = 20_000
    """Cap of the doubling step when shrinking (smaller: undershoot costs fairness)."""
    initial_hold_ns: int = 0
    """Extra hold before any window was seen (and always, when not adaptive)."""
    min_hold_ns: int = 0
    """Floor of the extra hold."""
    max_hold_ns: int = 10_000_000
    """Ceiling of the extra hold."""
    initial_delay_ns: int = 500_000
    """Delay estimate used until the first report arrives."""
    min_reporters: int = 1
    """Windows whose report stands for fewer endpoints are ignored (a partial view)."""

    def __post_init__(self) -> None:
        if self.percentile not in ("p50", "p95", "p97", "p99", "max"):
            raise ValueError(f"unknown percentile {self.percentile!r}")
        if not 0.0 < self.objective_late_fraction < 1.0:
            raise ValueError("objective_late_fraction must be in (0, 1)")
        if not 0.0 <= self.low_water < 1.0:
            raise ValueError("low_water must be in [0, 1)")
        if self.step_ns < 1 or self.calm_windows < 1:
            raise ValueError("step_ns and calm_windows must be >= 1")
        if not self.min_hold_ns <= self.initial_hold_ns <= self.max_hold_ns:
            raise ValueError("need min_hold_ns <= initial_hold_ns <= max_hold_ns")


@dataclass(frozen=True, slots=True)
class HoldDecision:
    """The outcome of one window."""

    at_ns: int
    """Clock reading when the decision was made."""
    action: HoldAction
    """What the extra hold did."""
    late_fraction: float
    """Worst endpoint late fraction of the window that drove it."""
    delay_estimate_ns: int
    """Global delay estimate in force after the window."""
    bounds_ns: int
    """Root bound + largest receiver bound in force after the window."""
    extra_hold_ns: int
    """Adaptive extra hold after the window."""
    hold_ns: int
    """Total offset of the deadline from the send time: what the publisher is told."""


@dataclass
class DeadlinePolicy:
    """Window-driven deadline policy. Pure: every input, including time, is an argument."""

    config: DeadlineConfig = field(default_factory=DeadlineConfig)
    history: list[HoldDecision] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.extra_hold_ns = self.config.initial_hold_ns
        self.delay_estimate_ns = self.config.initial_delay_ns
        self.bounds_ns = 0
        self._up_streak = 0
        self._calm_streak = 0
        self._down_steps = 0

    @property
    def hold_ns(self) -> int:
        """The deadline's offset from the send time now in force."""
        return self.delay_estimate_ns + self.bounds_ns + self.extra_hold_ns

    def observe(
        self,
        report: OwdReport | None,
        *,
        root_bound_ns: int,
        receiver_bound_ns: int,
        now_ns: int,
    ) -> HoldDecision:
        """Take one window's max-reduced report and the bounds in force; decide the hold."""
        cfg = self.config
        self.bounds_ns = max(0, root_bound_ns) + max(0, receiver_bound_ns)
        if report is None or report.count == 0 or report.reporters < cfg.min_reporters:
            return self._decide(now_ns, HoldAction.NO_DATA, 0.0)
        self.delay_estimate_ns = max(0, report.percentile_ns(cfg.percentile))
        late = report.worst_late_fraction
        if not cfg.adaptive:
            return self._decide(now_ns, HoldAction.FIXED, late)
        if late > cfg.objective_late_fraction:
            self._calm_streak = 0
            self._down_steps = 0
            step = min(cfg.step_ns << min(self._up_streak, 30), cfg.max_step_up_ns)
            self._up_streak += 1
            self.extra_hold_ns = min(cfg.max_hold_ns, self.extra_hold_ns + step)
            return self._decide(now_ns, HoldAction.UP, late)
        self._up_streak = 0
        if late <= cfg.objective_late_fraction * cfg.low_water:
            self._calm_streak += 1
            if self._calm_streak >= cfg.calm_windows and self.extra_hold_ns > cfg.min_hold_ns:
                self._calm_streak = 0
                step = min(cfg.step_ns << min(self._down_steps, 30), cfg.max_step_down_ns)
                self._down_steps += 1
                self.extra_hold_ns = max(cfg.min_hold_ns, self.extra_hold_ns - step)
                return self._decide(now_ns, HoldAction.DOWN, late)
            return self._decide(now_ns, HoldAction.KEEP, late)
        # Inside the band: hold still, and make the next move start small again.
        self._calm_streak = 0
        self._down_steps = 0
        return self._decide(now_ns, HoldAction.KEEP, late)

    def _decide(self, now_ns: int, action: HoldAction, late: float) -> HoldDecision:
        d = HoldDecision(
            at_ns=now_ns,
            action=action,
            late_fraction=late,
            delay_estimate_ns=self.delay_estimate_ns,
            bounds_ns=self.bounds_ns,
            extra_hold_ns=self.extra_hold_ns,
            hold_ns=self.hold_ns,
        )
        self.history.append(d)
        return d


class DeadlineStamper:
    """Stamps deadlines so that they never go backwards within a stream.

    A publisher stamps send + hold; when the hold shrinks by more than the gap between two
    sends, the later message would get the earlier deadline, so the deadline is clamped to
    the stream's previous one (the receivers' ReleaseSchedule clamps the same way).
    """

    def __init__(self) -> None:
        self._last: dict[int, int] = {}
        self.clamped = 0

    def stamp(self, *, stream_id: int, send_ns: int, hold_ns: int) -> int:
        deadline = send_ns + max(0, hold_ns)
        last = self._last.get(stream_id, 0)
        if deadline < last:
            self.clamped += 1
            return last
        self._last[stream_id] = deadline
        return deadline
