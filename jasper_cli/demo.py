"""`jasper demo`: a publisher, a hedged relay tree and N endpoints as real processes on loopback."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from jasper_cli.options import (
    FANOUT,
    HEDGE,
    HOLD_US,
    RATE,
    Number,
    UsageError,
    check_resolves,
    count,
    fraction,
    host_port,
    non_negative,
    output_dir,
    positive,
)
from jasper_cli.publisher import window_us_arg
from jasper_cli.receiver import wakeup_us_arg

# Pure-Python data plane on this 2-core budget: about 3.3·N sends and receives per message.
FULL_RATE_ENDPOINTS = 100
NATIVE_RATE = 10_000.0
"""Default msg/s with native receivers: bench/rate.py and docs/topology.md show the margin."""
PYTHON_RATE = 100.0
"""Default msg/s on the Python receive path (its late pairs stay under 0.1% near here)."""
NATIVE_BATCH_US = 500.0
"""Default batch window with native receivers: ~5 messages per datagram at 10,000 msg/s."""

# Every endpoint takes a loopback port (two with --deliver udp), and so does every relay.
MAX_RECEIVERS = 20_000

# Above this many endpoints `--control auto` uses the static path (see --help).
CONTROLLER_AUTO_MAX_RECEIVERS = 200


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run publisher, relays and endpoints on loopback and print a fairness report",
        description=(
            "Start a controller, a publisher, a tree of relays (fan-out F, hedging H) and N "
            "endpoints as real processes on loopback (MPs subscribe over the controller's REST "
            "API; --control static skips it), with an emulated cloud link model and per-node "
            "clocks with injected skew corrected by SNTP against a reference chronyd, stream "
            "synthetic order-book updates, stop everything and print the fairness report. "
            "Records and a "
            "JSON summary go to the output folder."
        ),
    )
    p.add_argument(
        "--receivers",
        type=count(1, MAX_RECEIVERS),
        default=100,
        help="MP endpoints N (default 100)",
    )
    p.add_argument("--fanout", type=FANOUT, default=10, help="tree fan-out F (default 10)")
    p.add_argument("--hedge", type=HEDGE, default=2, help="sibling hedging H (default 2)")
    p.add_argument(
        "--rate",
        type=RATE,
        default=None,
        help=f"messages/s (default {NATIVE_RATE:g} with native receivers, {PYTHON_RATE:g} on the "
        f"Python path; scaled down as rate*{FULL_RATE_ENDPOINTS}/N above "
        f"{FULL_RATE_ENDPOINTS} endpoints)",
    )
    p.add_argument(
        "--duration", type=positive("s"), default=10.0, help="seconds of publishing (10)"
    )
    p.add_argument(
        "--batch-us",
        type=window_us_arg,
        default=None,
        help=f"publisher batch window in µs: messages due within it share datagrams (default "
        f"{NATIVE_BATCH_US:g} with native receivers, 0 = one message per datagram otherwise)",
    )
    p.add_argument(
        "--hold-us",
        type=HOLD_US,
        default=None,
        help="deadline − send time in µs (default 5000 up to 200 endpoints, 20000 above)",
    )
    p.add_argument(
        "--tau-us", type=non_negative("µs"), default=50.0, help="DWS threshold of P(F), µs (50)"
    )
    p.add_argument("--warmup", type=count(0), default=0, help="messages excluded at the start (0)")
    p.add_argument("--no-link-model", action="store_true", help="turn the link model off")
    p.add_argument("--seed", type=count(0), default=1, help="link-model seed (1)")
    p.add_argument("--loss", type=fraction(), default=0.0, help="link-model loss per copy (0)")
    p.add_argument(
        "--link-median-us",
        type=positive("µs"),
        default=None,
        help="median delay of one modelled link, µs (default 40, a cloud region's; the "
        "pure-Python path on a shared 2-core host adds about 1 ms and a tail of several ms, "
        "so hold experiments want links in milliseconds, e.g. 1000)",
    )
    p.add_argument(
        "--link-p99-us",
        type=positive("µs"),
        default=None,
        help="99th percentile delay of one modelled link, µs (default 3x the median)",
    )
    p.add_argument(
        "--link-step",
        metavar="AT_S:SCALE",
        type=link_step_arg,
        action="append",
        default=[],
        help="step change of the link model AT_S seconds after the first message: every "
        "delay (median, p99, spikes) becomes SCALE times the starting model's, applied to "
        "every relay and receiver through the controller's PUT /v1/emulation/link-model. "
        "Repeat for several steps, e.g. --link-step 5:3 --link-step 12:1 (up, then back). "
        "Controller path only; the report then shows lateness, OML and the hold before and "
        "after each step, and the controller's windows",
    )
    p.add_argument(
        "--deliver",
        choices=("memory", "udp"),
        default="memory",
        help="hand messages over in process (default) or to a local UDP port per endpoint",
    )
    p.add_argument(
        "--endpoints-per-receiver",
        type=count(1),
        default=None,
        help="endpoints per receiver process (default: up to 200 endpoints, one receiver "
        "process per CPU, since receivers spinning to the same deadline on fewer cores than "
        "processes release one after another; above 200, 20 per process as in the paper)",
    )
    p.add_argument(
        "--no-realtime",
        action="store_true",
        help="keep every daemon SCHED_OTHER (by default relay and receiver loops and release "
        "threads run SCHED_FIFO, so a busy host delays them less)",
    )
    p.add_argument(
        "--cpu-wakeup-us",
        type=wakeup_us_arg,
        metavar="US",
        help="receivers ask the kernel that idle CPUs wake within US µs while they run (0: "
        "idle vCPUs poll instead of halting; see `jasper receiver --help`)",
    )
    p.add_argument(
        "--relays-per-process", type=count(1), default=6, help="relay nodes per process (6)"
    )
    p.add_argument(
        "--datapath",
        choices=("auto", "native", "python"),
        default="auto",
        help="receivers' receive path: native C thread, the Python reference, or auto (native "
        "where built)",
    )
    p.add_argument(
        "--fast-path", choices=("auto", "ebpf", "user"), default="auto", help="eBPF or user space"
    )
    p.add_argument(
        "--output",
        type=output_dir,
        default=None,
        help="output folder (default ./jasper-out/demo-<UTC timestamp>)",
    )
    p.add_argument(
        "--control",
        choices=("auto", "controller", "static"),
        default="auto",
        help="controller: a controller on loopback plans the tree and every MP subscribes over "
        "REST; static: a topology file written by the demo; auto (default): controller up to "
        f"{CONTROLLER_AUTO_MAX_RECEIVERS} endpoints, static above (starting hundreds of agents "
        "through the controller does not yet finish reliably on a 2-core machine)",
    )
    p.add_argument(
        "--hold-policy",
        choices=("fixed", "adaptive"),
        default="fixed",
        help="controller path: keep the hold fixed at --hold-us (default) or let the "
        "controller's deadline policy move it from the receivers' one-way-delay reports, "
        "starting at --hold-us",
    )
    p.add_argument(
        "--hold-objective",
        type=fraction(zero=False),
        default=0.01,
        metavar="FRACTION",
        help="adaptive hold: at most this fraction of one endpoint's messages late per "
        "window (0.01)",
    )
    p.add_argument(
        "--clock-skew-us",
        type=non_negative("µs"),
        default=500.0,
        help="emulated clock offsets drawn from ±this per process, µs (500)",
    )
    p.add_argument(
        "--clock-drift-ppm",
        type=Number(float, low=0, high=1000, unit="ppm"),
        default=20.0,
        help="emulated clock drifts drawn from ±this per process, ppm (20)",
    )
    p.add_argument("--clock-seed", type=count(0), default=1, help="seed of the clock skews (1)")
    p.add_argument(
        "--no-clock-sync",
        action="store_true",
        help="negative control: leave the emulated clocks uncorrected",
    )
    p.add_argument(
        "--kernel-clock",
        action="store_true",
        help="no emulated clocks: every process reads the kernel clock",
    )
    p.add_argument(
        "--ntp-server",
        type=host_port,
        metavar="HOST:PORT",
        default=None,
        help="correct the clocks against this server (default: start a reference chronyd on "
        "loopback)",
    )
    p.add_argument("--json", action="store_true", help="print the JSON summary instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from overlay.demo import DEMO_LINK_MODEL, DemoConfig, run_demo
    from overlay.publisher import batch_ns_of

    n = args.receivers
    from overlay.nativepath import native_available

    native = args.datapath != "python" and native_available()[0]
    full = NATIVE_RATE if native else PYTHON_RATE
    rate = args.rate
    if rate is None:
        rate = full if n <= FULL_RATE_ENDPOINTS else max(1.0, full * FULL_RATE_ENDPOINTS / n)
        if n > FULL_RATE_ENDPOINTS:
            print(
                f"rate defaults to {rate:g} msg/s for {n} endpoints on this CPU budget; "
                "pass --rate to override",
                file=sys.stderr,
            )
    if args.batch_us is None:
        args.batch_us = NATIVE_BATCH_US if native else 0.0
    hold_us = args.hold_us
    if hold_us is None:
        hold_us = 5000.0 if n <= 200 else 20000.0
    link_model = None
    if not args.no_link_model:
        link_model = dict(DEMO_LINK_MODEL, seed=args.seed, loss=args.loss)
        # With native receivers the whole path is emulated there and relays forward at once,
        # in the kernel where eBPF loads (docs/link-model.md); else every hop delays in Python.
        link_model["emulated_at"] = "receivers" if native else "hops"
        if args.link_median_us is not None:
            median_ns = round(args.link_median_us * 1000)
            link_model["median_ns"] = median_ns
            link_model["p99_ns"] = 3 * median_ns
        if args.link_p99_us is not None:
            link_model["p99_ns"] = round(args.link_p99_us * 1000)
        if link_model["p99_ns"] < link_model["median_ns"]:
            raise UsageError(
                f"--link-p99-us must be >= the median {link_model['median_ns'] / 1000:g} µs "
                f"(got {link_model['p99_ns'] / 1000:g})"
            )
    link_steps = tuple(sorted(args.link_step))
    if args.ntp_server:
        check_resolves("--ntp-server", args.ntp_server)
    messages = int(rate * args.duration)
    if messages < 1:
        raise UsageError(
            f"--duration {args.duration:g} s at {rate:g} msg/s sends no message: "
            f"the duration must be >= {1 / rate:g} s at this rate"
        )
    if args.warmup >= messages:
        raise UsageError(
            f"--warmup must be below the {messages} messages the run sends (got {args.warmup})"
        )
    out = args.output
    if out is None:
        out = Path("jasper-out") / time.strftime("demo-%Y%m%dT%H%M%SZ", time.gmtime())
        try:
            output_dir.check(out)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"the default output folder {exc}; pass --output") from None
    per_receiver = args.endpoints_per_receiver
    if per_receiver is None:
        cores = os.cpu_count() or 1
        per_receiver = max(20, -(-n // cores)) if n <= CONTROLLER_AUTO_MAX_RECEIVERS else 20
    control = args.control
    if control == "auto":
        control = "controller" if n <= CONTROLLER_AUTO_MAX_RECEIVERS else "static"
        if control == "static":
            print(
                f"jasper demo: {n} endpoints > {CONTROLLER_AUTO_MAX_RECEIVERS}: "
                "using the static control path (--control controller to force the controller)",
                file=sys.stderr,
            )
    if link_steps:
        problem = None
        if link_model is None:
            problem = "--link-step needs the link model (drop --no-link-model)"
        elif control == "static":
            problem = "--link-step needs the controller path (--control controller)"
        elif link_steps[-1][0] >= args.duration:
            problem = f"--link-step at {link_steps[-1][0]:g} s is not before --duration"
        if problem:
            raise UsageError(problem)
    cfg = DemoConfig(
        receivers=n,
        fanout=args.fanout,
        hedge=args.hedge,
        rate=rate,
        duration_s=args.duration,
        hold_ns=int(hold_us * 1000),
        batch_ns=batch_ns_of(args),
        tau_ns=int(args.tau_us * 1000),
        warmup_messages=args.warmup,
        link_model=link_model,
        endpoints_per_receiver=per_receiver,
        relays_per_process=args.relays_per_process,
        fast_path=args.fast_path,
        datapath=args.datapath,
        deliver=args.deliver,
        realtime=not args.no_realtime,
        cpu_wakeup_us=args.cpu_wakeup_us,
        control=control,
        hold_policy=args.hold_policy,
        emulate_clocks=not args.kernel_clock,
        clock_skew_us=args.clock_skew_us,
        clock_drift_ppm=args.clock_drift_ppm,
        clock_sync=not args.no_clock_sync,
        clock_seed=args.clock_seed,
        ntp_server=args.ntp_server,
        link_steps=link_steps,
        hold_objective=args.hold_objective,
    )
    summary = run_demo(cfg, out)
    if args.json:
        import json

        print(json.dumps({k: v for k, v in summary.items() if k != "text"}, indent=2, default=str))
    else:
        print(summary["text"])
        print(f"records and summary.json in {out}")
        print(f"report with plots: {summary['report_html']}")
    if summary.get("interrupted"):
        return 130
    return 0


def link_step_arg(text: str) -> tuple[float, float]:
    try:
        return parse_link_step(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be AT_S:SCALE with AT_S >= 0 and SCALE > 0, e.g. 5:3 (got {text!r})"
        ) from None


def parse_link_step(text: str) -> tuple[float, float]:
    """ "AT_S:SCALE" -> (seconds after the first message, delay scale)."""
    at, sep, scale = text.partition(":")
    try:
        if not sep:
            raise ValueError
        step = (float(at), float(scale))
    except ValueError:
        raise ValueError(f"--link-step {text!r}: expected AT_S:SCALE, e.g. 5:3") from None
    if step[0] < 0 or step[1] <= 0:
        raise ValueError(f"--link-step {text!r}: need AT_S >= 0 and SCALE > 0")
    return step
