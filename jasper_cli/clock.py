"""`jasper clock`: the local clock's bound, a loopback reference chronyd, an SNTP skew demo."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from jasper_cli.options import (
    CLOCK_DRIFT_PPM,
    PORT,
    PORT_OR_ANY,
    Number,
    check_resolves,
    host_port,
    non_negative,
    positive,
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "clock",
        help="clock error bound, reference chronyd, SNTP correction of an emulated clock",
        description=(
            "Clock error bounds as AWS ClockBound computes them from chrony "
            "(|offset| + root dispersion + root delay / 2, growing at 50 ppm)."
        ),
    )
    csub = p.add_subparsers(dest="clock_command", metavar="ACTION")

    st = csub.add_parser(
        "status",
        help="print the bound of the local clock (ClockBound shm, else chrony)",
        description=(
            "Read /var/run/clockbound/shm0 when present, else `chronyc -c tracking` from the "
            "system chronyd (or the one named by --chrony-host/--chrony-port), and print "
            "now/earliest/latest, the bound and the status."
        ),
    )
    st.add_argument("--chrony-host", help="chronyd command address or Unix socket path")
    st.add_argument("--chrony-port", type=PORT, help="chronyd command port")
    st.add_argument("--shm", default="/var/run/clockbound/shm0", help="ClockBound segment path")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=run_status)

    rs = csub.add_parser(
        "refserver",
        help="run a reference chronyd on loopback (chronyd -x: the system clock is untouched)",
        description=(
            "Start chronyd with its own config, ports, pid file and drift file in a private "
            "folder, serving this machine's clock as stratum 1 on 127.0.0.1, until Ctrl-C."
        ),
    )
    rs.add_argument("--port", type=PORT_OR_ANY, default=0, help="NTP port (default: a free one)")
    rs.add_argument(
        "--cmd-port", type=PORT_OR_ANY, default=0, help="command port (default: a free one)"
    )
    rs.add_argument(
        "--duration", type=non_negative("s"), default=0.0, help="stop after this many seconds"
    )
    rs.set_defaults(func=run_refserver)

    sy = csub.add_parser(
        "sync",
        help="emulate a skewed node clock and correct it by SNTP against a server",
        description=(
            "Build a software clock with an injected offset and drift, correct it with SNTP "
            "bursts against SERVER (host:port), and print its true error beside its bound."
        ),
    )
    sy.add_argument(
        "server", nargs="?", type=host_port, help="NTP server host:port (default: start one here)"
    )
    sy.add_argument(
        "--offset-us", type=Number(float, unit="µs"), default=500.0, help="injected offset (us)"
    )
    sy.add_argument("--drift-ppm", type=CLOCK_DRIFT_PPM, default=20.0, help="injected drift (ppm)")
    sy.add_argument("--interval", type=positive("s"), default=1.0, help="seconds between bursts")
    sy.add_argument("--duration", type=positive("s"), default=5.0, help="seconds to run")
    sy.add_argument("--no-correct", action="store_true", help="measure only (negative control)")
    sy.set_defaults(func=run_sync)

    def _help(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)


def run_status(args: argparse.Namespace) -> int:
    from jasper.clockbound import ClockStatus
    from overlay.clocksync import ChronyTarget, local_clock_bound

    target = ChronyTarget(host=args.chrony_host, port=args.chrony_port)
    bound, source = local_clock_bound(shm_path=args.shm, chrony=target)
    now = time.time_ns()
    status = bound.status_at(now)
    known = status is not ClockStatus.UNKNOWN
    b = bound.bound_ns(now) if known else None
    if args.json:
        print(
            json.dumps(
                {
                    "status": status.label,
                    "source": source,
                    "now_ns": now,
                    "bound_ns": b,
                    "earliest_ns": now - b if b is not None else None,
                    "latest_ns": now + b if b is not None else None,
                }
            )
        )
    else:
        print(f"source    {source}")
        print(f"status    {status.label}")
        print(f"now       {now} ns")
        if b is not None:
            print(f"bound     {b / 1000:.3f} us")
            print(f"earliest  {now - b} ns")
            print(f"latest    {now + b} ns")
        else:
            print("bound     unknown")
    return 0 if status is ClockStatus.SYNCHRONIZED else 1


def run_refserver(args: argparse.Namespace) -> int:
    from overlay.refclock import ChronyConfig, ReferenceChrony

    ref = ReferenceChrony(ChronyConfig(ntp_port=args.port, cmd_port=args.cmd_port))
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        ref.start()
        print(
            f"reference chronyd pid {ref.proc.pid if ref.proc else '?'}: NTP 127.0.0.1:"
            f"{ref.ntp_port}, command 127.0.0.1:{ref.cmd_port} and {ref.socket_path}",
            flush=True,
        )
        print(f"try: chronyc -h 127.0.0.1 -p {ref.cmd_port} tracking", flush=True)
        end = time.monotonic() + args.duration if args.duration > 0 else None
        while not stop and (end is None or time.monotonic() < end):
            if ref.proc is None or ref.proc.poll() is not None:
                print("chronyd exited", file=sys.stderr)
                return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        ref.cleanup()
    return 0


def run_sync(args: argparse.Namespace) -> int:
    import asyncio

    from overlay.clocks import SoftwareClock
    from overlay.clocksync import ClockDiscipline
    from overlay.refclock import ReferenceChrony

    async def main(server: tuple[str, int]) -> None:
        clock = SoftwareClock(offset_ns=int(args.offset_us * 1000), drift_ppm=args.drift_ppm)
        disc = ClockDiscipline(
            clock=clock, server=server, interval_s=args.interval, correct=not args.no_correct
        )
        disc.start()
        print(f"{'t (s)':>6} {'true error (us)':>16} {'bound (us)':>11} status")
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < args.duration:
                await asyncio.sleep(0.5)
                true_ns, now = clock.sample()
                b = clock.bound()
                status = b.status_at(now)
                bound = f"{b.bound_ns(now) / 1000:11.1f}" if status.value else f"{'-':>11}"
                print(
                    f"{time.monotonic() - t0:6.1f} {(now - true_ns) / 1000:16.1f} {bound} "
                    f"{status.label}"
                )
        finally:
            await disc.stop()

    if args.server:
        check_resolves("server", args.server)
        host, _, port = args.server.rpartition(":")
        asyncio.run(main((host or "127.0.0.1", int(port))))
        return 0
    with ReferenceChrony() as ref:
        print(f"started reference chronyd on 127.0.0.1:{ref.ntp_port}")
        asyncio.run(main(("127.0.0.1", ref.ntp_port)))
    return 0
