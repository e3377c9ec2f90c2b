"""Running a daemon as a process: arguments, signals, ready file, status and records at exit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from overlay.common import load_topology, write_json
from overlay.release import LOOP_PRIORITY, make_realtime, tune_interpreter

log = logging.getLogger(__name__)


def _probe_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not -1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port}: a port is 0-65535 (or -1 for no prober)")
    return port


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < seconds < 3600:
        raise argparse.ArgumentTypeError(f"{seconds:g} s: must be > 0 and under an hour")
    return seconds


def add_common_arguments(p: argparse.ArgumentParser, *, kind: str) -> None:
    """The arguments of /work/notes/cli-contract.md shared by relay, receiver and publisher."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--topology", metavar="FILE", help="static topology file (.json or .toml)")
    src.add_argument("--controller", metavar="URL", help="controller to take plans from")
    p.add_argument(
        "--node-name",
        required=True,
        metavar="NAME",
        help=(
            "node name in the topology"
            + ("; several relays may share one process: r1.0,r1.1" if kind == "relay" else "")
        ),
    )
    from overlay.credential import add_credential_arguments

    add_credential_arguments(p)
    p.add_argument("--data-addr", metavar="IP", help="data-plane address (controller mode)")
    p.add_argument(
        "--probe-port",
        type=_probe_port,
        default=0,
        metavar="PORT",
        help="UDP port of the latency prober (controller mode; 0 = any free port, -1 = no "
        "prober: the controller then places this node without its measurements), e.g. for a "
        "security group that opens one fixed port",
    )
    p.add_argument(
        "--heartbeat-s",
        type=_positive_seconds,
        default=1.0,
        metavar="S",
        help="seconds between heartbeats to the controller (controller mode; the controller's "
        "--heartbeat-timeout must be several times this)",
    )
    p.add_argument(
        "--records",
        metavar="DIR",
        help="write ground-truth records (.npy) and a status JSON here at exit",
    )
    p.add_argument("--ready-file", metavar="FILE", help="create FILE once the sockets are bound")
    p.add_argument(
        "--status-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="also write the status JSON into --records every S seconds while running",
    )
    from overlay.clocksync import add_clock_arguments

    add_clock_arguments(p.add_argument_group("node clock (default: the kernel clock)"))
    p.add_argument(
        "--no-link-model",
        action="store_true",
        help="ignore the topology's link model (it is applied when the topology has one)",
    )


async def _node_clock(
    args: argparse.Namespace, name: str
) -> tuple[Callable[[], int], Callable[[], bool], Any]:
    """(clock, synced, service): an emulated or chrony-watched clock when asked for.

    Without clock options the node runs on the kernel clock, which on one host is the truth,
    so it counts as synchronized.
    """
    if getattr(args, "clock_offset_us", None) is None and not getattr(args, "chrony_host", None):
        return time.time_ns, lambda: True, None
    from overlay.clocksync import clock_service_from_args

    service = clock_service_from_args(args, name=name)
    await service.start()
    return service.now_ns, service.synced, service


def _stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def _shutting_down() -> None:
    """From here on a second SIGINT/SIGTERM must not kill the process half-way through
    writing its records. The loop's own handlers are removed first: closing the loop would
    otherwise restore the default actions."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)


def _ready(path: str | None) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(path)


async def _until_stopped(
    stop: asyncio.Event, status: Callable[[], dict[str, Any]], path: Path | None, every_s: float
) -> None:
    """Wait for the stop signal, writing the status to `path` every `every_s` seconds."""
    if path is None or every_s <= 0:
        await stop.wait()
        return
    while not stop.is_set():
        write_json(path, status())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


def controller_mode(kind: str, args: argparse.Namespace) -> int:
    """Hand the process to the node agent (overlay/agent.py), which takes plans from URL."""
    try:
        from overlay import agent
    except ImportError:
        print("controller mode needs overlay/agent.py, which is not installed", file=sys.stderr)
        return 2
    serve = getattr(agent, "serve_daemon", None)
    if serve is None:
        print("overlay.agent has no serve_daemon(kind, args)", file=sys.stderr)
        return 2
    return int(serve(kind, args) or 0)


def run_relay(args: argparse.Namespace) -> int:
    from overlay.relay import Relay

    if args.controller:
        return controller_mode("relay", args)
    topo = load_topology(args.topology)
    names = [n for n in args.node_name.split(",") if n]

    async def main() -> int:
        tune_interpreter()
        if args.realtime:
            make_realtime(LOOP_PRIORITY)
        clock, _synced, clock_service = await _node_clock(args, names[0])
        relay = Relay(topo, names, link_model=not args.no_link_model, clock=clock)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        _stop_on_signals(loop, stop)
        try:
            relay.start(loop)
            mode = relay.enable_fast_path(args.fast_path)
            log.info("relay %s up (%s path)", ",".join(names), mode)
            _ready(args.ready_file)
            status_path = (
                Path(args.records) / f"status-relay-{names[0]}.json" if args.records else None
            )
            await _until_stopped(stop, relay.status, status_path, args.status_interval)
            _shutting_down()
            relay.flush()
        finally:
            status = relay.status()
            relay.close()
            if clock_service is not None:
                await clock_service.stop()
        if args.records:
            write_json(Path(args.records) / f"status-relay-{names[0]}.json", status)
        return 0

    return asyncio.run(main())


def run_receiver(args: argparse.Namespace) -> int:
    from overlay.receiver import Receiver, audit_log_of, deliver_of
    from overlay.recordlog import releases_of, save_releases

    if args.controller:
        return controller_mode("receiver", args)
    topo = load_topology(args.topology)

    async def main() -> int:
        tune_interpreter()
        if not args.no_realtime and not args.no_realtime_loop:
            make_realtime(LOOP_PRIORITY)
        clock, synced, clock_service = await _node_clock(args, args.node_name)
        rx = Receiver(
            topo,
            args.node_name,
            clock=clock,
            synced=synced,
            link_model=not args.no_link_model,
            spin_ns=args.spin_us * 1000,
            realtime=not args.no_realtime,
            deliver=deliver_of(args),
            cpu_wakeup_us=args.cpu_wakeup_us,
            release_threads=args.release_threads,
            datapath=getattr(args, "datapath", "auto"),
            reading_then=clock_service.clock.reading_then if clock_service else None,
            auditor=audit_log_of(
                args, topo, clock_service.clock if clock_service is not None else None
            ),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        _stop_on_signals(loop, stop)
        try:
            rx.start(loop)
            mode = rx.enable_fast_path(args.fast_path)
            log.info(
                "receiver %s up: %d endpoints (%s data path, %s dedup)",
                args.node_name,
                len(rx.endpoints),
                rx.datapath,
                mode,
            )
            _ready(args.ready_file)
            status_path = (
                Path(args.records) / f"status-receiver-{args.node_name}.json"
                if args.records
                else None
            )
            await _until_stopped(stop, rx.status, status_path, args.status_interval)
            _shutting_down()
            rx.stop()
        finally:
            status = rx.status()
            rx.close()
            if clock_service is not None:
                await clock_service.stop()
        if args.records:
            out = Path(args.records)
            save_releases(out / f"releases-{args.node_name}.npz", releases_of(rx.records))
            write_json(out / f"status-receiver-{args.node_name}.json", status)
        return 0

    return asyncio.run(main())


def run_publisher(args: argparse.Namespace) -> int:
    from overlay.publisher import Publisher, batch_ns_of, open_ingress

    if args.controller:
        return controller_mode("publisher", args)
    topo = load_topology(args.topology)
    try:
        ingress = open_ingress(getattr(args, "source", "synthetic"))
    except OSError as exc:
        print(f"jasper publisher: cannot listen on {args.source}: {exc}", file=sys.stderr)
        return 2

    async def main() -> int:
        tune_interpreter()
        if args.realtime:
            make_realtime(LOOP_PRIORITY)
        clock, _synced, clock_service = await _node_clock(args, args.node_name)
        pub = Publisher(
            topo,
            clock=clock,
            hold_ns=None if args.hold_us is None else int(args.hold_us * 1000),
            batch_ns=batch_ns_of(args),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        _stop_on_signals(loop, stop)
        if args.start_at:
            # Start on a shared wall-clock instant (the demo waits for every process first).
            delay = args.start_at - time.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        _ready(args.ready_file)
        started = time.monotonic()
        progress_path = Path(args.records) / "progress" if args.records else None

        def progress(n: int) -> None:
            if progress_path is not None:
                progress_path.write_text(str(n))

        n = 0
        try:
            if not stop.is_set() and ingress is not None:
                log.info(
                    "publisher: taking messages from %s (%s)", args.source, ingress.getsockname()
                )
                n = await pub.run_ingress(
                    ingress, duration_s=args.duration, stop=stop, progress=progress
                )
            elif not stop.is_set():
                n = await pub.run(
                    rate=args.rate,
                    duration_s=args.duration,
                    stop=stop,
                    progress=progress,
                )
            if not stop.is_set() and pub.retransmit is not None:
                # The last messages' losses are NAKed within about one hold: answer them.
                elapsed = time.monotonic() - started
                await pub.linger(min(2.0, 0.2 + 20 * pub.hold_ns / 1e9))
                started += time.monotonic() - started - elapsed  # the rate excludes it
        finally:
            _shutting_down()
            elapsed = time.monotonic() - started
            status: dict[str, Any] = pub.status()
            status["messages"] = n
            status["source"] = getattr(args, "source", "synthetic")
            status["offered_rate"] = args.rate if ingress is None else None
            status["achieved_rate"] = n / elapsed if elapsed > 0 else 0.0
            status["elapsed_s"] = elapsed
            pub.close()
            if ingress is not None:
                ingress.close()
            if clock_service is not None:
                await clock_service.stop()
        if args.records:
            out = Path(args.records)
            pub.records.save(out / "sent.npy")
            write_json(out / "status-publisher.json", status)
        return 0

    return asyncio.run(main())
