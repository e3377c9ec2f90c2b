"""Release hold per stream: the deadline policy fed by receivers' delay reports in heartbeats."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field, replace

from jasper.deadline import DeadlineConfig, DeadlinePolicy, HoldAction, HoldDecision
from jasper.owd import OwdReport, max_reduce

HISTORY_WINDOWS = 3600
"""Decisions kept per stream (an hour at one window per second)."""


@dataclass(frozen=True, slots=True)
class HoldWindow:
    """One decision with the size of the report behind it."""

    decision: HoldDecision
    """What the policy did."""
    reporters: int
    """Endpoint windows the max-reduced report stood for (0: no report)."""
    count: int
    """Messages the report covered."""


@dataclass
class StreamHold:
    """The hold of one stream: its policy, the reports of the open window, its history."""

    stream_id: int
    policy_name: str
    """"fixed" or "adaptive" (the stream's hold_policy)."""
    configured_hold_ns: int
    """The stream's hold_ns setting: the fixed hold, or the adaptive starting hold."""
    policy: DeadlinePolicy
    hold_ns: int
    """Hold in force: what the publisher stamps with (send time -> deadline), ns."""
    pending: dict[str, OwdReport] = field(default_factory=dict)
    """Node -> its reports since the last decision, max-reduced."""
    opened: float | None = None
    """time.monotonic() of the first report of the open window."""
    history: collections.deque[HoldWindow] = field(
        default_factory=lambda: collections.deque(maxlen=HISTORY_WINDOWS)
    )


class HoldControl:
    """Runs one `DeadlinePolicy` per stream, one window per round of receiver reports.

    A window closes when every receiver host of the stream has reported since the last
    decision (with at least `min_window_count` messages), or `window_s` after its first
    report (a silent host does not stall the loop).
    Reports are max-reduced across hosts, as within a host, so the hold covers the slowest
    endpoint. The controller's hold meaning is the total (send time to deadline), the same as
    the topology's `stream.hold_ns`; the policy's adaptive part is `extra_hold_ns`.
    """

    def __init__(
        self,
        *,
        window_s: float = 2.0,
        objective_late_fraction: float = 0.01,
        min_window_count: int = 200,
    ) -> None:
        self.window_s = window_s
        self.min_window_count = min_window_count
        """A complete round of reports closes the window only with this many messages (a
        heartbeat sent early, right after a plan was applied, carries only a few)."""
        self.objective_late_fraction = objective_late_fraction
        self.streams: dict[int, StreamHold] = {}

    def configure(
        self, *, stream_id: int, policy: str, hold_ns: int, resume_ns: int | None = None
    ) -> StreamHold:
        """The stream's hold state; starts over when its policy or hold setting changed.

        `resume_ns`: the adaptive hold in force before a controller restart, taken as the
        starting point instead of the setting when the state is first made.
        """
        s = self.streams.get(stream_id)
        if s is not None and (s.policy_name, s.configured_hold_ns) == (policy, hold_ns):
            return s
        start = hold_ns
        if s is None and resume_ns is not None and policy == "adaptive":
            start = resume_ns
        config = DeadlineConfig(
            adaptive=policy == "adaptive",
            objective_late_fraction=self.objective_late_fraction,
            # Before any report the whole starting hold stands in for the delay estimate.
            initial_delay_ns=start,
            initial_hold_ns=0,
        )
        s = StreamHold(
            stream_id=stream_id,
            policy_name=policy,
            configured_hold_ns=hold_ns,
            policy=DeadlinePolicy(config),
            hold_ns=start,
        )
        self.streams[stream_id] = s
        return s

    def report(self, node: str, reports: list[OwdReport]) -> None:
        """Reports from one node's heartbeat (for streams this controller knows)."""
        now = time.monotonic()
        for r in reports:
            s = self.streams.get(r.stream_id)
            if s is None or r.count == 0:
                continue
            old = s.pending.get(node)
            s.pending[node] = r if old is None else max_reduce((old, r))
            if s.opened is None:
                s.opened = now

    def ready(self, stream_id: int, hosts: set[str]) -> bool:
        """Whether the stream's open window should close now."""
        s = self.streams.get(stream_id)
        if s is None or s.opened is None:
            return False
        complete = bool(hosts) and hosts <= set(s.pending)
        if complete and sum(r.count for r in s.pending.values()) >= self.min_window_count:
            return True
        return time.monotonic() - s.opened >= self.window_s

    def close_window(
        self, stream_id: int, *, root_bound_ns: int, receiver_bound_ns: int, now_ns: int
    ) -> bool:
        """Decide the stream's hold from its open window; True when the hold in force changed."""
        s = self.streams[stream_id]
        reports = list(s.pending.values())
        s.pending = {}
        s.opened = None
        report = max_reduce(reports) if reports else None
        d = s.policy.observe(
            report,
            root_bound_ns=root_bound_ns,
            receiver_bound_ns=receiver_bound_ns,
            now_ns=now_ns,
        )
        if d.action is HoldAction.FIXED or s.policy_name == "fixed":
            # Fixed: the setting is the hold; the window is kept for its lateness and delays.
            d = replace(d, extra_hold_ns=0, hold_ns=s.configured_hold_ns)
        s.history.append(
            HoldWindow(
                decision=d,
                reporters=report.reporters if report else 0,
                count=report.count if report else 0,
            )
        )
        if d.action is HoldAction.NO_DATA or d.hold_ns == s.hold_ns:
            return False
        s.hold_ns = d.hold_ns
        return True
