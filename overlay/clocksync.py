"""Clock sync I/O: chrony tracking via chronyc, the ClockBound shm reader, and an SNTP client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import mmap
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jasper.clockbound import (
    DEFAULT_MAX_DRIFT_PPM,
    UNKNOWN_BOUND,
    ClockBound,
    ClockStatus,
    ShmParseError,
    TrackingParseError,
    TrackingReport,
    bound_from_shm,
    bound_from_tracking,
    parse_clockbound_shm,
    parse_tracking_csv,
)
from jasper.ntp import (
    NtpError,
    NtpSample,
    OffsetEstimate,
    encode_request_cookie,
    min_delay_estimate,
)
from jasper.ntp import sample_from_reply as _sample_from_reply
from overlay.clocks import SoftwareClock, SystemClock

log = logging.getLogger(__name__)

CLOCKBOUND_SHM_PATH = "/var/run/clockbound/shm0"
# Linux's CLOCK_MONOTONIC_COARSE (6), which ClockBound stamps its segment with.
_CLOCK_MONOTONIC_COARSE: int = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)


# --- chrony ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChronyTarget:
    """Which chronyd to ask. All None = chronyc's default (the system daemon)."""

    host: str | None = None
    """Command address, or the path of chronyd's Unix command socket."""
    port: int | None = None
    """Command port (chrony's cmdport, 323 by default)."""

    def argv(self, chronyc: str) -> list[str]:
        argv = [chronyc, "-c", "-n"]
        if self.host:
            argv += ["-h", self.host]
        if self.port:
            argv += ["-p", str(self.port)]
        return [*argv, "tracking"]

    def label(self) -> str:
        if self.host and self.host.startswith("/"):
            return f"chrony {self.host}"
        return f"chrony {self.host or 'local'}:{self.port or 323}"


class ChronyUnavailable(RuntimeError):
    """chronyc is missing, or no chronyd answered."""


def _chronyc() -> str:
    exe = shutil.which("chronyc")
    if exe is None:
        raise ChronyUnavailable("chronyc not found (apt-get install chrony)")
    return exe


def read_tracking(target: ChronyTarget | None = None, *, timeout_s: float = 3.0) -> TrackingReport:
    """Run `chronyc -c tracking` against `target` and parse it."""
    target = target or ChronyTarget()
    try:
        out = subprocess.run(
            target.argv(_chronyc()), capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        raise ChronyUnavailable(f"chronyc timed out against {target.label()}") from exc
    if out.returncode != 0:
        detail = (out.stderr or out.stdout).strip()
        raise ChronyUnavailable(f"{target.label()}: {detail or f'exit {out.returncode}'}")
    try:
        return parse_tracking_csv(out.stdout)
    except TrackingParseError as exc:
        raise ChronyUnavailable(f"{target.label()}: {exc}") from exc


async def read_tracking_async(
    target: ChronyTarget | None = None, *, timeout_s: float = 3.0
) -> TrackingReport:
    """`read_tracking` without blocking the loop."""
    target = target or ChronyTarget()
    proc = await asyncio.create_subprocess_exec(
        *target.argv(_chronyc()), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise ChronyUnavailable(f"chronyc timed out against {target.label()}") from exc
    if proc.returncode != 0:
        detail = (stderr or stdout).decode(errors="replace").strip()
        raise ChronyUnavailable(f"{target.label()}: {detail or f'exit {proc.returncode}'}")
    try:
        return parse_tracking_csv(stdout.decode())
    except TrackingParseError as exc:
        raise ChronyUnavailable(f"{target.label()}: {exc}") from exc


def chrony_bound(
    target: ChronyTarget | None = None, *, max_drift_ppm: float = DEFAULT_MAX_DRIFT_PPM
) -> ClockBound:
    """The bound of the system clock as a chronyd reports it (raises ChronyUnavailable)."""
    target = target or ChronyTarget()
    report = read_tracking(target)
    return bound_from_tracking(
        report, read_at_ns=time.time_ns(), max_drift_ppm=max_drift_ppm, source=target.label()
    )


# --- AWS ClockBound shared memory -----------------------------------------------------------


def read_clockbound_shm(path: str = CLOCKBOUND_SHM_PATH, *, retries: int = 10) -> ClockBound:
    """Read the ClockBound daemon's segment the way its client does (seqlock on generation)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ShmParseError(f"{path} is empty")
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
            for _ in range(retries):
                first = parse_clockbound_shm(bytes(mm[:size]))
                if first.generation % 2 == 1:
                    continue  # the daemon is mid-update
                mono = time.clock_gettime_ns(_CLOCK_MONOTONIC_COARSE)
                real = time.time_ns()
                again = parse_clockbound_shm(bytes(mm[:size]))
                if again.generation != first.generation:
                    continue
                return bound_from_shm(first, now_mono_ns=mono, now_realtime_ns=real)
    raise ShmParseError(f"{path}: no consistent snapshot after {retries} reads")


def local_clock_bound(
    *, shm_path: str = CLOCKBOUND_SHM_PATH, chrony: ChronyTarget | None = None
) -> tuple[ClockBound, str]:
    """The best bound for the system clock: ClockBound's shm where present, else chrony.

    Returns the bound and a human note on where it came from or why it is unknown.
    """
    if Path(shm_path).exists():
        try:
            return read_clockbound_shm(shm_path), f"ClockBound shm {shm_path}"
        except (OSError, ShmParseError) as exc:
            log.warning("ClockBound shm unreadable, falling back to chrony: %s", exc)
    try:
        target = chrony or ChronyTarget()
        return chrony_bound(target), target.label()
    except ChronyUnavailable as exc:
        return UNKNOWN_BOUND, f"no clock source: {exc}"


# --- SNTP client over the emulated clock ------------------------------------------------------


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")


class SntpClient:
    """SNTP exchanges with one server, timestamped with the node's clock (`clock()` in ns).

    The receive time t4 is the kernel's receive timestamp (SO_TIMESTAMPNS) mapped onto the
    node's clock by `clock_at` (for a SoftwareClock, its `reading_at`: what the node's clock
    read at that kernel instant), so event-loop latency does not widen the measured delay.
    Without `clock_at`, or when the kernel gives no timestamp, t4 is `clock()` on receipt.
    """

    def __init__(
        self,
        *,
        server: tuple[str, int],
        clock: Callable[[], int],
        clock_at: Callable[[int], int] | None = None,
        timeout_s: float = 0.5,
    ) -> None:
        self.server = server
        self.clock = clock
        self.clock_at = clock_at
        self.timeout_s = timeout_s
        self.errors: dict[str, int] = {}
        self._sock: socket.socket | None = None
        self._waiter: asyncio.Future[tuple[bytes, int]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.connect(self.server)
        loop.add_reader(sock.fileno(), self._on_readable)
        self._sock, self._loop = sock, loop

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, anc, _flags, _src = self._sock.recvmsg(512, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if self._waiter is not None and not self._waiter.done():
                    self._waiter.set_exception(exc)
                return
            t4 = self.clock()
            if self.clock_at is not None:
                for level, kind, body in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = _TIMESPEC.unpack_from(body)
                        t4 = self.clock_at(sec * 1_000_000_000 + nsec)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result((data, t4))
            else:
                self._count("stray")

    def _count(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    async def exchange(self) -> NtpSample | None:
        """One request/reply; None (and counted) on timeout or a bad reply."""
        if self._sock is None:
            await self.open()
        assert self._sock is not None
        waiter: asyncio.Future[tuple[bytes, int]] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        cookie = random.getrandbits(64)
        request = encode_request_cookie(cookie)
        sock_send = self._sock.send
        clock = self.clock
        try:
            t1 = clock()
            sock_send(request)
            data, t4 = await asyncio.wait_for(waiter, self.timeout_s)
        except TimeoutError:
            self._count("timeout")
            return None
        except OSError:
            self._count("socket")
            return None
        finally:
            self._waiter = None
        try:
            return _sample_from_reply(data, t1_ns=t1, t4_ns=t4, cookie=cookie)
        except NtpError as exc:
            self._count(exc.reason)
            return None

    async def burst(self, count: int, *, gap_s: float = 0.002) -> list[NtpSample]:
        """`count` exchanges `gap_s` apart; the valid samples."""
        samples: list[NtpSample] = []
        for i in range(count):
            if i:
                await asyncio.sleep(gap_s)
            s = await self.exchange()
            if s is not None:
                samples.append(s)
        return samples


@dataclass(frozen=True, slots=True)
class SyncRecord:
    """One correction made by a ClockDiscipline."""

    at_ns: int
    """Corrected clock reading right after the correction."""
    offset_ns: int
    """Measured server-minus-client offset (the step applied when correcting)."""
    bound_ns: int
    """Bound installed with the correction."""
    delay_ns: int
    """Round-trip delay of the chosen sample."""
    samples: int
    """Valid samples in the burst."""
    burst_started_true_ns: int = 0
    """Kernel time when the burst's first exchange began (which clock the samples saw)."""


@dataclass
class ClockDiscipline:
    """Keeps a SoftwareClock corrected by periodic SNTP bursts against a reference server.

    Each round: a burst of `samples` exchanges, min-delay selection, then a step of the
    clock by the measured offset with the estimate's bound (grown at the clock's max drift
    from the chosen sample to the step). With `correct=False` the exchanges still run (and
    `history` records the measured offsets) but the clock is left alone: the negative control.
    """

    clock: SoftwareClock
    server: tuple[str, int]
    interval_s: float = 1.0
    """Time between bursts."""
    samples: int = 8
    """Exchanges per burst."""
    correct: bool = True
    """Apply the corrections (False = measure only)."""
    client_precision_ns: int = 1_000
    """Bound on our own timestamping error beyond the measured delay, ns."""
    free_run_after: int = 3
    """Consecutive failed bursts after which the clock reports free-running."""
    timeout_s: float = 0.5
    """Reply timeout of one exchange."""
    history: list[SyncRecord] = field(default_factory=list)
    failures: int = 0
    failed_in_a_row: int = 0

    @property
    def last_offset_ns(self) -> int | None:
        """Node clock minus reference at the last burst, before its correction (chrony's
        sign: positive = fast)."""
        return -self.history[-1].offset_ns if self.history else None

    def __post_init__(self) -> None:
        self._client = SntpClient(
            server=self.server,
            clock=self.clock.now_ns,
            clock_at=self.clock.reading_at,
            timeout_s=self.timeout_s,
        )
        self._task: asyncio.Task[None] | None = None

    async def sync_once(self) -> OffsetEstimate | None:
        """One burst and (unless measuring only) one correction."""
        started_true_ns = time.time_ns()
        samples = await self._client.burst(self.samples)
        if not samples:
            self.failures += 1
            self.failed_in_a_row += 1
            b = self.clock.bound()
            if self.failed_in_a_row >= self.free_run_after and b.status is ClockStatus.SYNCHRONIZED:
                # Say so: the bound keeps growing from the last good sync, the status drops.
                self.clock.apply_correction(
                    delta_ns=0, bound=dataclasses.replace(b, status=ClockStatus.FREE_RUNNING)
                )
            return None
        self.failed_in_a_row = 0
        est = min_delay_estimate(
            samples,
            client_precision_ns=self.client_precision_ns,
            max_drift_ppm=self.clock.max_drift_ppm,
        )
        before = self.clock.now_ns()
        if self.correct:
            # The estimate held at est.as_of_ns; the clock may have drifted since, at most at
            # max_drift_ppm, until the step lands.
            age_ns = max(0, before - est.as_of_ns)
            base = est.bound_ns + int(age_ns * self.clock.max_drift_ppm / 1e6 + 0.999999)
            bound = ClockBound(
                status=ClockStatus.SYNCHRONIZED,
                as_of_ns=before + est.offset_ns,
                base_bound_ns=base,
                max_drift_ppm=self.clock.max_drift_ppm,
                source=f"sntp {self.server[0]}:{self.server[1]}",
            )
            self.clock.apply_correction(delta_ns=est.offset_ns, bound=bound)
            bound_ns = base
        else:
            bound_ns = est.bound_ns
        self.history.append(
            SyncRecord(
                at_ns=self.clock.now_ns(),
                offset_ns=est.offset_ns,
                bound_ns=bound_ns,
                delay_ns=est.delay_ns,
                samples=est.samples,
                burst_started_true_ns=started_true_ns,
            )
        )
        return est

    async def run(self) -> None:
        """Sync every `interval_s` until cancelled."""
        try:
            while True:
                try:
                    await self.sync_once()
                except Exception:  # a bad round must not end the discipline
                    self.failures += 1
                    log.exception("sntp sync against %s failed", self.server)
                await asyncio.sleep(self.interval_s)
        finally:
            self._client.close()

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._client.close()


@dataclass
class ChronyWatcher:
    """Keeps a SystemClock's bound fresh from a chronyd (real hosts: the system daemon)."""

    clock: SystemClock
    target: ChronyTarget = field(default_factory=ChronyTarget)
    interval_s: float = 1.0
    max_drift_ppm: float = DEFAULT_MAX_DRIFT_PPM
    last: TrackingReport | None = None
    failures: int = 0

    @property
    def last_offset_ns(self) -> int | None:
        """chrony's system time offset (positive = fast), ns."""
        return None if self.last is None else round(self.last.system_time_offset_s * 1e9)

    async def read_once(self) -> ClockBound:
        try:
            report = await read_tracking_async(self.target)
        except ChronyUnavailable as exc:
            self.failures += 1
            # Say it once per outage, not once per poll.
            level = (
                logging.WARNING if self.failures == 1 or self.last is not None else logging.DEBUG
            )
            log.log(level, "chrony unavailable: %s", exc)
            self.last = None
            # Keep the last bound: it goes on growing, and turns free-running when stale.
            return self.clock.bound()
        self.last = report
        self.failures = 0
        bound = bound_from_tracking(
            report,
            read_at_ns=self.clock.now_ns(),
            max_drift_ppm=self.max_drift_ppm,
            source=self.target.label(),
        )
        self.clock.set_bound(bound)
        return bound

    async def run(self) -> None:
        while True:
            await self.read_once()
            await asyncio.sleep(self.interval_s)


def clock_heartbeat(
    clock: SoftwareClock | SystemClock, sync: ClockDiscipline | ChronyWatcher | None = None
) -> dict[str, Any]:
    """The `clock` part of a node heartbeat: {status, bound_ns, offset_ns}, exactly the
    controller's ClockStatus schema (which forbids other keys).

    bound_ns is the bound at this instant (None when unknown); offset_ns is the node clock
    minus its reference at the last measurement (None when never measured).
    """
    now = clock.now_ns()
    b = clock.bound()
    status = b.status_at(now)
    return {
        "status": status.label,
        "bound_ns": b.bound_ns(now) if status is not ClockStatus.UNKNOWN else None,
        "offset_ns": None if sync is None else sync.last_offset_ns,
    }


# --- one object per node for the daemons --------------------------------------------------


class ClockService:
    """A node's clock with whatever keeps it honest, in one object for a daemon.

    Emulated node: a SoftwareClock with injected skew, corrected by SNTP against a reference
    chronyd. Real host: the kernel clock with its bound from ClockBound's shm or chrony.
    Pass `service.now_ns` as the daemon's clock, `service.synced` to the receiver,
    `service.heartbeat` to the agent.
    """

    def __init__(
        self,
        clock: SoftwareClock | SystemClock,
        sync: ClockDiscipline | ChronyWatcher | None = None,
        *,
        step_file: str | None = None,
    ) -> None:
        self.clock = clock
        self.sync = sync
        self.step_file = step_file
        """Emulation fault hook: on SIGUSR1 the emulated clock steps by the signed number of
        ns written in this file (see `step`). None: no hook, SIGUSR1 keeps its default."""
        self.steps: list[tuple[int, int]] = []
        """(kernel time, ns) of every fault step taken."""
        self._task: asyncio.Task[None] | None = None
        self._step_signal = False
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    def emulated(
        cls,
        *,
        offset_ns: int,
        drift_ppm: float,
        server: tuple[str, int] | None,
        interval_s: float = 1.0,
        correct: bool = True,
        name: str = "",
    ) -> ClockService:
        """Injected skew; corrected against `server` (None: never corrected, never synced)."""
        clock = SoftwareClock(offset_ns=offset_ns, drift_ppm=drift_ppm, name=name)
        if server is None:
            return cls(clock)
        return cls(
            clock,
            ClockDiscipline(clock=clock, server=server, interval_s=interval_s, correct=correct),
        )

    @classmethod
    def system(cls, *, target: ChronyTarget | None = None, interval_s: float = 1.0) -> ClockService:
        """The kernel clock, its bound read from chrony every `interval_s`."""
        clock = SystemClock()
        return cls(clock, ChronyWatcher(clock=clock, target=target or ChronyTarget()))

    def now_ns(self) -> int:
        return self.clock.now_ns()

    def synced(self) -> bool:
        return self.clock.bound().status_at(self.clock.now_ns()) is ClockStatus.SYNCHRONIZED

    def heartbeat(self) -> dict[str, Any]:
        return clock_heartbeat(self.clock, self.sync)

    def step(self, delta_ns: int) -> None:
        """A fault: the emulated clock jumps by `delta_ns` while its bound stays as it was, so
        the node's error exceeds its claimed bound until the next SNTP burst measures the jump
        and corrects it. Only a SoftwareClock can step (the kernel clock is everyone's)."""
        if not isinstance(self.clock, SoftwareClock):
            raise TypeError("only an emulated clock (--clock-offset-us) can be stepped")
        self.clock.apply_correction(delta_ns=delta_ns, bound=self.clock.bound())
        stepped_at = time.time_ns()
        self.steps.append((stepped_at, delta_ns))
        log.warning("emulated clock of %s stepped by %+d ns (fault)", self.clock.name, delta_ns)
        if self.step_file is not None and isinstance(self.sync, ClockDiscipline):
            with contextlib.suppress(RuntimeError):  # no running loop: nobody to watch
                self._watch = asyncio.get_running_loop().create_task(
                    self._report_correction(delta_ns, stepped_at, len(self.sync.history))
                )

    async def _report_correction(self, delta_ns: int, stepped_at_ns: int, seen: int) -> None:
        """Write `<step file>.corrected` (JSON) once the next SNTP burst has corrected the
        step: when, and what offset it measured, so the fault's cost needs no guessing."""
        assert isinstance(self.sync, ClockDiscipline) and self.step_file is not None
        assert isinstance(self.clock, SoftwareClock)
        # The first burst begun after the step: one already running sampled the clock before
        # it and measures nothing of the jump.
        while True:
            later = [r for r in self.sync.history[seen:] if r.burst_started_true_ns > stepped_at_ns]
            if later:
                break
            await asyncio.sleep(0.005)
        rec = later[0]
        doc = {
            "step_ns": delta_ns,
            "stepped_at_ns": stepped_at_ns,
            "corrected_at_ns": time.time_ns(),
            "measured_offset_ns": rec.offset_ns,
            "error_after_ns": self.clock.error_ns(),
        }
        Path(self.step_file + ".corrected").write_text(json.dumps(doc))

    def _on_step_signal(self) -> None:
        assert self.step_file is not None
        try:
            delta_ns = int(Path(self.step_file).read_text().strip() or 0)
        except (OSError, ValueError) as exc:
            log.error("clock step file %s unreadable: %s", self.step_file, exc)
            return
        self.step(delta_ns)

    async def start(self) -> None:
        """First sync (so the daemon starts on a corrected clock), then keep syncing."""
        if self.step_file is not None and isinstance(self.clock, SoftwareClock):
            # Before the first burst: a step requested during start-up must not kill us.
            try:
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGUSR1, self._on_step_signal)
                self._step_signal = True
            except RuntimeError as exc:  # a loop outside the main thread gets no signals
                log.warning("no clock-step signal hook: %s", exc)
        if isinstance(self.sync, ClockDiscipline):
            await self.sync.sync_once()
            self._task = self.sync.start()
        elif isinstance(self.sync, ChronyWatcher):
            await self.sync.read_once()
            self._task = asyncio.get_running_loop().create_task(self.sync.run())

    async def stop(self) -> None:
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()
        if self._step_signal:
            self._step_signal = False
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        if isinstance(self.sync, ClockDiscipline):
            await self.sync.stop()
        elif self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None


def add_clock_arguments(p: Any) -> None:
    """Daemon options for an emulated node clock (argparse parser or group)."""
    p.add_argument(
        "--clock-offset-us", type=float, default=None,
        help="emulate this node's clock with this offset (us); off by default (kernel clock)",
    )  # fmt: skip
    p.add_argument(
        "--clock-drift-ppm", type=float, default=0.0,
        help="drift of the emulated clock (ppm)",
    )  # fmt: skip
    p.add_argument(
        "--ntp-server", default=None, metavar="HOST:PORT",
        help="correct the emulated clock by SNTP against this server (a reference chronyd)",
    )  # fmt: skip
    p.add_argument(
        "--chrony-host", default=None,
        help="real clock: chronyd command address or socket to read the bound from",
    )  # fmt: skip
    p.add_argument("--chrony-port", type=int, default=None, help="real clock: chronyd command port")
    p.add_argument(
        "--clock-step-file", default=None, metavar="FILE",
        help="emulation faults: on SIGUSR1 step the emulated clock by the signed ns in FILE "
        "(needs --clock-offset-us)",
    )  # fmt: skip


def clock_service_from_args(args: Any, *, name: str = "") -> ClockService:
    """The ClockService the options of `add_clock_arguments` ask for."""
    if getattr(args, "clock_offset_us", None) is not None:
        server = None
        if args.ntp_server:
            host, _, port = str(args.ntp_server).rpartition(":")
            server = (host or "127.0.0.1", int(port))
        service = ClockService.emulated(
            offset_ns=int(args.clock_offset_us * 1000),
            drift_ppm=float(args.clock_drift_ppm),
            server=server,
            name=name,
        )
        service.step_file = getattr(args, "clock_step_file", None)
        return service
    return ClockService.system(
        target=ChronyTarget(host=getattr(args, "chrony_host", None),
                            port=getattr(args, "chrony_port", None))
    )  # fmt: skip
