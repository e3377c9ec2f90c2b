"""Precise release: a thread that sleeps to just before each deadline, then spins to it."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from jasper.schedule import Release, ReleaseSchedule
from overlay.kernel import set_timer_slack

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_PREPARE_NS = 500_000
"""The thread wakes this long before a deadline to take the batch out of the schedule (20
entries cost 50-75 µs on a busy 2-core host, measured), then sleeps again until the spin."""

DEFAULT_SPIN_NS = 100_000
"""The last stretch before a deadline is a busy wait: a wake-up from sleep overshoots by tens
of µs even with 1 ns timer slack. Kept short, since several receivers sharing few CPUs spin at
the same deadlines."""

REALTIME_PRIORITY = 10
"""SCHED_FIFO priority of release threads: above every ordinary process, below kernel
threads that use 50+ (a spin lasts at most spin_ns, and RT throttling bounds the rest)."""

DEFAULT_SWITCH_INTERVAL_S = 20e-6
"""GIL switch interval while a release thread runs. The default (5 ms) lets the receive loop
keep the GIL for up to 5 ms while the release thread waits to run its deadline."""


SPIN_SWITCH_INTERVAL_S = 5e-6
"""GIL switch interval while spinning to a deadline: the GIL comes back within µs."""

HANDOVER_SWITCH_INTERVAL_S = 1e-3
"""GIL switch interval while a due batch is handed over (tens of µs): no switch midway."""


LOOP_PRIORITY = 5
"""SCHED_FIFO priority of a daemon's event-loop thread when it runs real-time: below the
release threads, above every ordinary process. A release thread waits for the GIL; if the
thread holding it is a normal task preempted by the rest of a busy host, that wait lasts
milliseconds (measured: release error p99 40-57 ms at load 10-20, 0.2 ms with this)."""


def make_realtime(priority: int) -> bool:
    """Put the calling thread in SCHED_FIFO at `priority`; False (logged) without privilege.

    RT throttling (sched_rt_runtime_us, 95% by default) still leaves the rest of the host a
    share should a real-time thread ever spin.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (OSError, AttributeError) as exc:
        log.info("thread stays SCHED_OTHER: %s", exc)
        return False
    return True


def tune_interpreter(switch_interval_s: float = DEFAULT_SWITCH_INTERVAL_S) -> None:
    """Shorten the GIL switch interval and the main thread's timer slack for this process."""
    sys.setswitchinterval(switch_interval_s)
    set_timer_slack(1)


class PreciseRelease(Generic[T]):
    """Holds items in a ReleaseSchedule and hands each batch due to `deliver` on time.

    `deliver(batch)` runs on the release thread, never on the event loop, so a deadline does
    not wait behind a burst of receives; it must be thread-safe with respect to the loop (the
    receiver's delivery only sends on sockets and appends to records).
    """

    def __init__(
        self,
        *,
        endpoints: int,
        deliver: Callable[[Sequence[Release[T]]], None],
        capacity: int = 65536,
        clock: Callable[[], int] = time.time_ns,
        spin_ns: int = DEFAULT_SPIN_NS,
        prepare_ns: int = DEFAULT_PREPARE_NS,
        name: str = "release",
        realtime: bool = True,
    ) -> None:
        self.schedule: ReleaseSchedule[T] = ReleaseSchedule(capacity=capacity, endpoints=endpoints)
        self._deliver = deliver
        self._clock = clock
        self.spin_ns = spin_ns
        self.prepare_ns = max(prepare_ns, spin_ns)
        self._cond = threading.Condition()
        self._stop = False
        self._stopping = False
        self._drain_on_stop = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.realtime = realtime
        """Ask for SCHED_FIFO on the release thread, so a wake-up does not queue behind
        ordinary processes (falls back to normal scheduling without the privilege)."""
        self.realtime_ok = False
        """Whether the release thread got SCHED_FIFO."""
        self.batches = 0
        """Batches handed to `deliver`."""
        self.errors = 0
        """Exceptions raised by `deliver` (logged; the thread keeps going)."""

    def start(self) -> None:
        self._thread.start()

    def hold(
        self,
        *,
        deadline_ns: int,
        stream_id: int,
        seq: int,
        endpoint: int,
        item: T,
        clamp: bool = True,
    ) -> bool:
        """Queue one item for `endpoint`; False when the schedule is full (counted there).
        `clamp=False`: a recovered message keeps its own deadline (ReleaseSchedule.order)."""
        with self._cond:
            earliest = self.schedule.get_timer()
            ok = self.schedule.push(
                deadline_ns=deadline_ns, stream_id=stream_id, seq=seq, endpoint=endpoint,
                item=item, clamp=clamp,
            )  # fmt: skip
            # Wake the thread only when it may be sleeping past this deadline.
            if ok and (earliest is None or deadline_ns < earliest):
                self._cond.notify()
        return ok

    def stop(self, *, drain: bool = True, timeout: float = 5.0) -> None:
        """Stop the thread.

        With drain, the thread keeps releasing on time until nothing is held (up to
        `timeout` seconds), then hands over whatever is left at once; without, held items are
        dropped.
        """
        with self._cond:
            self._stopping = True
            self._drain_on_stop = drain
            if not drain:
                self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._stop = True
                self._cond.notify()
            self._thread.join(timeout)

    def _run(self) -> None:
        set_timer_slack(1)
        if self.realtime:
            self.realtime_ok = make_realtime(REALTIME_PRIORITY)
        cond = self._cond
        clock = self._clock
        schedule = self.schedule
        while True:
            with cond:
                while not self._stop and not len(schedule):
                    if self._stopping:
                        self._stop = True
                        break
                    cond.wait()
                if self._stop:
                    break
                deadline = schedule.get_timer()
                assert deadline is not None
                ahead = deadline - clock() - self.prepare_ns
                if ahead > 0:
                    # Sleeping on the condition lets an earlier deadline cut the sleep short.
                    cond.wait(ahead / 1e9)
                    continue
                # Take the batch out before the deadline: building 20 Release objects costs
                # tens of µs, which would otherwise land on the first endpoint's release.
                # Entries for this deadline accepted from now on join it before the spin.
                due = schedule.pop_due(deadline)
            until_spin = deadline - clock() - self.spin_ns
            if until_spin > 0:
                time.sleep(until_spin / 1e9)
            with cond:
                # Copies accepted since the batch was taken out join it (few, so cheap).
                more = schedule.pop_due(deadline)
            if more:
                due.extend(more)
                n = schedule.endpoints
                due.sort(
                    key=lambda r: (r.deadline_ns, r.stream_id, r.seq, (r.endpoint - r.seq) % n)
                )
            # While spinning, a thread holding the GIL must give it back within µs, not within
            # the normal switch interval, or the deadline waits behind the receive loop.
            normal = sys.getswitchinterval()
            sys.setswitchinterval(SPIN_SWITCH_INTERVAL_S)
            try:
                while clock() < deadline:
                    pass
                # Now keep the GIL until the batch is handed over: a switch to the loop
                # thread in between would land on the remaining endpoints' release times.
                sys.setswitchinterval(HANDOVER_SWITCH_INTERVAL_S)
                if due:
                    self._hand_over(due)
            finally:
                sys.setswitchinterval(normal)
        if self._drain_on_stop:
            with cond:
                rest = []
                while (r := schedule.pop_next()) is not None:
                    rest.append(r)
            if rest:
                self._hand_over(rest)

    def _hand_over(self, batch: Sequence[Release[T]]) -> None:
        self.batches += 1
        try:
            self._deliver(batch)
        except Exception:
            self.errors += 1
            log.exception("release delivery failed")
